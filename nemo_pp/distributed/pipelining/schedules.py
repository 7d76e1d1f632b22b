"""Schedule names, placement styles, up-front constraint checks and schedule building.

Names are torch's (``get_schedule_class``: GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble, ZBVZeroBubble, DualPipeV), case-insensitive, plus the
spellings users write in YAML (``interleaved_1f1b``, ``looped_bfs``, ``zbv``,
``zero_bubble``, ``dualpipev``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

logger = logging.getLogger(__name__)

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
#: ``reshard_after_forward=False`` or grads come out None or wrong (DESIGN.md).
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


def schedule_style(name: str) -> str:
    """Stage placement of a schedule: ``"v"`` for ZBVZeroBubble/DualPipeV, else ``"loop"``."""
    return "v" if canonical_schedule_name(name) in V_STYLE_SCHEDULES else "loop"


@dataclass(frozen=True)
class ScheduleCheck:
    """What :func:`check_schedule_constraints` derived: torch name and microbatch count."""

    name: str
    n_microbatches: int


def check_schedule_constraints(
    schedule: str,
    pp_size: int,
    num_stages: int,
    local_batch_size: int,
    microbatch_size: int,
) -> ScheduleCheck:
    """Check a schedule against the pipeline shape with arithmetic only (no model, no comms).

    Run it before any weight is loaded so every rank fails the same way, fast.

    Args:
        schedule: schedule name (any accepted spelling).
        pp_size: pipeline-parallel ranks.
        num_stages: total (virtual) stages over all ranks.
        local_batch_size: samples per ``schedule.step`` on one pp group (``pp_batch_size``).
        microbatch_size: samples per microbatch (``pp_microbatch_size``).

    Raises:
        ValueError: naming the config key and the fix.
    """
    name = canonical_schedule_name(schedule)
    if microbatch_size < 1 or local_batch_size < 1:
        raise ValueError("distributed.pipeline.pp_microbatch_size and dataloader.batch_size must be >= 1")
    if local_batch_size % microbatch_size != 0:
        raise ValueError(
            f"pp_batch_size (dataloader.batch_size = {local_batch_size}) is not divisible by "
            f"distributed.pipeline.pp_microbatch_size = {microbatch_size}; choose a batch size that "
            f"is a multiple of the microbatch size"
        )
    n_mb = local_batch_size // microbatch_size
    stages_per_rank, rem = divmod(num_stages, pp_size)
    if rem:
        raise ValueError(f"{num_stages} stages cannot be spread evenly over pp_size={pp_size} ranks")
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
        raise ValueError(f"schedule {name} needs exactly 2 stages per rank, got {stages_per_rank}")
    if name == "1F1B" and n_mb < num_stages:
        raise ValueError(
            f"schedule 1F1B needs at least as many microbatches as stages: {n_mb} microbatches "
            f"(dataloader.batch_size {local_batch_size} / pp_microbatch_size {microbatch_size}) < "
            f"{num_stages} stages; raise dataloader.batch_size or lower pp_microbatch_size"
        )
    if name == "DualPipeV" and n_mb < num_stages:
        raise ValueError(
            f"schedule DualPipeV needs at least as many microbatches as stages: {n_mb} < {num_stages}; "
            "raise dataloader.batch_size or lower pp_microbatch_size"
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
        one list of ``_Action`` per rank (empty cells dropped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable action (row and column named), or no rows.
    """
    import csv

    from torch.distributed.pipelining.schedules import _Action

    key = "distributed.pipeline.pp_schedule_csv"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file '{path}' does not exist")
    rows = []
    with open(path, newline="") as f:
        for r, row in enumerate(csv.reader(f)):
            actions = []
            for c, cell in enumerate(row):
                if not cell.strip():
                    continue
                try:
                    action = _Action.from_str(cell)
                except Exception as exc:  # torch raises RuntimeError/ValueError/AttributeError
                    raise ValueError(f"{key}: '{path}' row {r + 1} column {c + 1}: cannot read action '{cell}' ({exc})") from exc
                if action is None or action.stage_index is None:
                    raise ValueError(f"{key}: '{path}' row {r + 1} column {c + 1}: '{cell}' names no stage")
                actions.append(action)
            rows.append(actions)
    if not rows or not any(rows):
        raise ValueError(f"{key}: '{path}' holds no actions")
    return rows


def csv_stage_ids(rows: list[list]) -> list[tuple[int, ...]]:
    """Stage indices each pp rank runs in a parsed CSV schedule, sorted."""
    return [tuple(sorted({a.stage_index for a in row})) for row in rows]


def build_pipeline_schedule(
    pipeline_parallel_schedule_csv: str | None,
    pipeline_parallel_schedule: str | None,
    microbatch_size: int,
    local_batch_size: int,
    stages: list,
    loss_fn: Callable,
    scale_grads: bool = False,
):
    """Build a torch pipeline schedule for this rank's ``stages``.

    Args:
        pipeline_parallel_schedule_csv: path of a schedule in ``_PipelineScheduleRuntime``
            CSV format, or None.
        pipeline_parallel_schedule: schedule name (see :data:`SCHEDULE_NAMES`).
        microbatch_size: samples per microbatch.
        local_batch_size: samples per ``step()`` (split into ``local_batch_size //
            microbatch_size`` microbatches).
        stages: this rank's ``PipelineStage`` objects.
        loss_fn: ``loss_fn(output, target) -> scalar`` run on the last stage.
        scale_grads: let torch divide grads by the microbatch count after each step;
            keep False when normalising by label tokens (it breaks accumulation
            across steps).

    Returns:
        a ``_PipelineSchedule``.

    Raises:
        ValueError / FileNotFoundError: bad name, impossible microbatch count, bad CSV.
    """
    pp_size = stages[0].group_size
    num_stages = stages[0].num_stages
    if pipeline_parallel_schedule_csv:
        rows = read_schedule_csv(pipeline_parallel_schedule_csv)
        if len(rows) != pp_size:
            raise ValueError(
                f"distributed.pipeline.pp_schedule_csv: '{pipeline_parallel_schedule_csv}' has {len(rows)} rows "
                f"(one per pp rank) but pp_size is {pp_size}"
            )
        used_mb = {a.microbatch_index for row in rows for a in row if a.microbatch_index is not None}
        if local_batch_size % microbatch_size:
            raise ValueError(
                f"pp_batch_size {local_batch_size} is not divisible by pp_microbatch_size {microbatch_size}"
            )
        n_mb = local_batch_size // microbatch_size
        if used_mb != set(range(n_mb)):
            raise ValueError(
                f"distributed.pipeline.pp_schedule_csv: '{pipeline_parallel_schedule_csv}' schedules microbatches "
                f"{sorted(used_mb)} but the batch splits into {n_mb} (pp_batch_size {local_batch_size} / "
                f"pp_microbatch_size {microbatch_size})"
            )
        cls = torch_schedules._PipelineScheduleRuntime
        if pipeline_parallel_schedule:
            named = get_schedule_class(canonical_schedule_name(pipeline_parallel_schedule))
            if issubclass(named, torch_schedules._PipelineScheduleRuntime):
                cls = named
        schedule = cls(stages, n_microbatches=n_mb, loss_fn=loss_fn, scale_grads=scale_grads)
        try:
            schedule._load_csv(pipeline_parallel_schedule_csv)
        except Exception as exc:  # torch raises assorted errors on malformed rows
            raise ValueError(
                f"distributed.pipeline.pp_schedule_csv: cannot read '{pipeline_parallel_schedule_csv}' "
                f"as a pipeline schedule: {exc}"
            ) from exc
        return schedule

    if not pipeline_parallel_schedule:
        raise ValueError("set distributed.pipeline.pp_schedule (e.g. 1f1b) or pp_schedule_csv")
    check = check_schedule_constraints(pipeline_parallel_schedule, pp_size, num_stages, local_batch_size, microbatch_size)
    cls = get_schedule_class(check.name)
    if issubclass(cls, PipelineScheduleSingle):
        schedule = cls(stages[0], n_microbatches=check.n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    else:
        schedule = cls(stages, n_microbatches=check.n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    logger.info(
        "built %s schedule: %d stages over %d ranks, %d microbatches of %d",
        check.name, num_stages, pp_size, check.n_microbatches, microbatch_size,
    )
    return schedule
