"""Schedule names, placement styles, up-front constraint checks and CSV schedules.

Names are torch's (``get_schedule_class``: GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble, ZBVZeroBubble, DualPipeV), case-insensitive, plus the
spellings users write in YAML (``interleaved_1f1b``, ``looped_bfs``, ``zbv``,
``zero_bubble``, ``dualpipev``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

#: Canonical torch names of the schedules nemo_pp supports.
SCHEDULE_NAMES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
_EXTRA_ALIASES = {"zbv": "ZBVZeroBubble", "zerobubble": "InterleavedZeroBubble", "zbvzerobubble": "ZBVZeroBubble"}
#: Schedules whose stages are placed in a "V" (rank r holds r and 2*pp-1-r).
V_STYLE_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
#: Schedules that split backward into input and weight parts: with FSDP2 they need
#: ``reshard_after_forward=False`` or grads come out None or wrong (docs/architecture.md).
SPLIT_BACKWARD_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def canonical_schedule_name(name: str, key: str = "distributed.pipeline.pp_schedule") -> str:
    """Map a user-written schedule name to torch's name.

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    table = {_squash(n): n for n in SCHEDULE_NAMES}
    table.update(_EXTRA_ALIASES)
    found = table.get(_squash(str(name)))
    if found is None:
        raise ValueError(
            f"{key}: unknown pipeline schedule '{name}'. Valid schedules: {', '.join(SCHEDULE_NAMES)} "
            "(case-insensitive; aliases: interleaved_1f1b, looped_bfs, zero_bubble, zbv, dualpipev)"
        )
    return found


def is_single_stage_schedule(name: str) -> bool:
    """True for schedules that run exactly one stage per rank (GPipe, 1F1B)."""
    return issubclass(get_schedule_class(canonical_schedule_name(name)), PipelineScheduleSingle)


def runs_action_lists(name: str) -> bool:
    """True for schedules that execute a per-rank action list (torch's runtime subclasses),
    so they can run a CSV schedule."""
    from nemo_pp._torch_compat import runtime_schedule_class

    cls = get_schedule_class(canonical_schedule_name(name))
    return runtime_schedule_class(cls) is cls


def schedule_style(name: str) -> str:
    """Stage placement of a schedule: ``"v"`` for ZBVZeroBubble/DualPipeV, else ``"loop"``."""
    return "v" if canonical_schedule_name(name) in V_STYLE_SCHEDULES else "loop"


@dataclass(frozen=True)
class ScheduleCheck:
    """What :func:`check_schedule_constraints` derived: torch name and microbatch count."""

    name: str
    n_microbatches: int


def check_stage_layout(schedule: str, pp_size: int, num_stages: int) -> str:
    """Check that ``num_stages`` fit the schedule over ``pp_size`` ranks; return torch's name.

    Raises:
        ValueError: stages not a multiple of pp_size, a single-stage schedule with
            several stages per rank, a multi-stage one with fewer than two, a V schedule
            without exactly two; the message names the key and the fix.
    """
    name = canonical_schedule_name(schedule)
    stages_per_rank, rem = divmod(num_stages, pp_size)
    if rem:
        raise ValueError(
            f"{num_stages} stages cannot be spread evenly over pp_size={pp_size} ranks; give "
            "distributed.pipeline.module_fqns_per_model_part a multiple of pp_size stages"
        )
    if is_single_stage_schedule(name) and stages_per_rank != 1:
        raise ValueError(
            f"schedule {name} runs exactly one stage per rank but the split gives {stages_per_rank}; "
            "set distributed.pipeline.layers_per_stage to null or pick a multi-stage schedule "
            "(Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV)"
        )
    if not is_single_stage_schedule(name) and stages_per_rank < 2:
        raise ValueError(
            f"schedule {name} needs at least 2 stages per rank but the split gives {stages_per_rank}; "
            "lower distributed.pipeline.layers_per_stage or use 1F1B/GPipe"
        )
    if name in V_STYLE_SCHEDULES and stages_per_rank != 2:
        raise ValueError(
            f"schedule {name} needs exactly 2 stages per rank, got {stages_per_rank}; "
            "set distributed.pipeline.layers_per_stage to null"
        )
    return name


def microbatch_count(batch_size: int, microbatch_size: int) -> int:
    """Microbatches per ``schedule.step``.

    Raises:
        ValueError: a size below 1, or a batch that is not a multiple of the microbatch.
    """
    if microbatch_size < 1 or batch_size < 1:
        raise ValueError("distributed.pipeline.pp_microbatch_size and dataloader.batch_size must be >= 1")
    if batch_size % microbatch_size:
        raise ValueError(
            f"pp_batch_size (dataloader.batch_size = {batch_size}) is not divisible by "
            f"distributed.pipeline.pp_microbatch_size = {microbatch_size}; choose a batch size that "
            "is a multiple of the microbatch size"
        )
    return batch_size // microbatch_size


def check_schedule_constraints(
    schedule: str,
    pp_size: int,
    num_stages: int,
    local_batch_size: int,
    microbatch_size: int,
) -> ScheduleCheck:
    """Check a schedule against the pipeline shape with arithmetic only (no model, no comms).

    Args:
        schedule: schedule name (any accepted spelling).
        pp_size: pipeline-parallel ranks.
        num_stages: total (virtual) stages over all ranks.
        local_batch_size: samples per ``schedule.step`` on one pp group (``pp_batch_size``).
        microbatch_size: samples per microbatch (``pp_microbatch_size``).

    Raises:
        ValueError: see :func:`check_stage_layout`, plus microbatch counts the schedule
            cannot run; naming the config key and the fix.
    """
    name = check_stage_layout(schedule, pp_size, num_stages)
    n_mb = microbatch_count(local_batch_size, microbatch_size)
    if name in ("1F1B", "DualPipeV") and n_mb < num_stages:
        raise ValueError(
            f"schedule {name} needs at least as many microbatches as stages: {n_mb} microbatches "
            f"(dataloader.batch_size {local_batch_size} / pp_microbatch_size {microbatch_size}) < "
            f"{num_stages} stages; raise dataloader.batch_size or lower pp_microbatch_size"
        )
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_mb // pp_size)
        if n_mb % rounds:
            raise ValueError(
                f"schedule {name} needs the number of microbatches ({n_mb}) to be a multiple of "
                f"max(1, microbatches // pp_size) = {rounds}; use a multiple of pp_size={pp_size} microbatches"
            )
    return ScheduleCheck(name=name, n_microbatches=n_mb)


def read_schedule_csv(path: str) -> list[list]:
    """Parse a compute-only schedule CSV: row r lists pp rank r's actions (``0F0``, ``1B2``, ...).

    Returns:
        one list per rank of ``Action`` objects, None for an empty (idle) cell, as
        torch's ``_load_csv`` reads them.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable action (row and column named), or no actions.
    """
    import csv

    from nemo_pp._torch_compat import action_from_str

    key = "distributed.pipeline.pp_schedule_csv"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file '{path}' does not exist")
    rows = []
    with open(path, newline="") as f:
        for r, row in enumerate(csv.reader(f)):
            actions = []
            for c, cell in enumerate(row):
                try:
                    action = action_from_str(cell)
                except Exception as exc:  # torch raises RuntimeError/ValueError/AttributeError
                    raise ValueError(f"{key}: '{path}' row {r + 1} column {c + 1}: cannot read action '{cell}' ({exc})") from exc
                if action is not None and action.stage_index is None:
                    raise ValueError(f"{key}: '{path}' row {r + 1} column {c + 1}: '{cell}' names no stage")
                actions.append(action)
            rows.append(actions)
    if not any(a is not None for row in rows for a in row):
        raise ValueError(f"{key}: '{path}' holds no actions")
    return rows


def csv_stage_ids(rows: list[list]) -> list[tuple[int, ...]]:
    """Stage indices each pp rank runs in a parsed CSV schedule, sorted."""
    return [tuple(sorted({a.stage_index for a in row if a is not None})) for row in rows]
