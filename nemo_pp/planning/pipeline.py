"""The pipeline plan: every decision about stages, placement and microbatches, made once.

:func:`make_pipeline_plan` turns the pipeline settings and the model's module tree
into an immutable :class:`PipelinePlan`. It needs no weights (a meta-device model is
enough) and no process group, so the recipe computes it on every rank before any
work starts and a bad setting fails everywhere alike. Stage building, the schedule,
tied-embedding sync, static shapes and the inspection tools all read the plan;
nothing downstream derives stage counts, placement or CSV contents again
(docs/architecture.md, "The plan").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from nemo_pp.models.module_tree import find_layer_stack, outer_modules, stage_parameters
from nemo_pp.models.moe import moe_layer_indices, router_spec
from nemo_pp.planning.cost import DEFAULT_PLANNING_SEQ_LEN, PieceCosts, balanced_layer_counts, flop_costs
from nemo_pp.planning.schedules import (
    SPLIT_BACKWARD_SCHEDULES,
    canonical_schedule_name,
    check_schedule_constraints,
    check_stage_layout,
    csv_stage_ids,
    is_single_stage_schedule,
    microbatch_count,
    read_schedule_csv,
    runs_action_lists,
    schedule_style,
)
from nemo_pp.planning.split import (
    auto_stage_module_names,
    calculate_virtual_stages,
    stage_ids_this_rank,
    validate_stage_modules,
)

__all__ = ["PipelinePlan", "StageSpec", "make_pipeline_plan"]

_KEY = "distributed.pipeline"


@dataclass(frozen=True)
class StageSpec:
    """How every stage of a run executes: what its forward and its static P2P shapes need
    to know beyond its modules (the same for all stages of a run).

    Attributes:
        patch_inner_model / patch_causal_lm_model: install nemo_pp's tensor-returning
            forwards on the decoder / the causal-LM wrapper (``models.stage_forward``).
        sequence_shards: under sequence parallelism the tp size (hidden states travel as
            ``[mb, S / tp, H]``; positions and masks are built for the whole ``S``), else 1.
        activation_dtype: dtype of the hidden states stages exchange: FSDP2 mixed
            precision's compute dtype, else the pipeline's ``dtype``; None: the
            parameters' dtype.
        seq_len: tokens per sample the static shapes are set for at build time
            (``pp_seq_len``); None: set by the first ``update_seq_len``.
    """

    patch_inner_model: bool = True
    patch_causal_lm_model: bool = True
    sequence_shards: int = 1
    activation_dtype: torch.dtype | None = None
    seq_len: int | None = None


@dataclass(frozen=True)
class PipelinePlan:
    """Where every stage lives and what it holds, for the whole pipeline (all pp ranks).

    Attributes:
        pp_size: pipeline-parallel ranks.
        schedule: torch's schedule name (``"1F1B"``, ``"ZBVZeroBubble"``, ...); with a CSV,
            the runtime subclass that runs it (e.g. ``"DualPipeV"``) or None.
        schedule_csv: path of the CSV schedule, or None.
        csv_actions: the parsed CSV, row r = pp rank r's compute actions (None = idle
            slot), or None.
        placement: ``"loop"`` (rank r holds r, r+pp, ...), ``"v"`` (r and 2*pp-1-r) or
            ``"csv"`` (the file decides).
        stage_ids: ``stage_ids[pp_rank]``: the global stage indices that rank holds, sorted.
        module_fqns: ``module_fqns[stage]``: the module FQNs of that stage; None when
            planned without a model (a schedule alone).
        microbatch_size: samples per microbatch (``pp_microbatch_size``).
        batch_size: samples per ``schedule.step`` (``pp_batch_size``); None when unknown.
        stage: how the stages execute (:class:`StageSpec`).
        scale_grads: torch divides all gradients by the microbatch count after every
            ``step`` (``scale_grads_in_schedule``; the recipe refuses it).
        defer_fsdp_grad_sync: FSDP2 reduce-scatters once per optimizer step, not once per
            accumulated batch (``AutoPipeline.set_grad_sync``).
        pool_recv_buffers: under a one-stage-per-rank schedule (1F1B), the point-to-point
            receive buffers of the microbatches share as few buffers as the microbatches a
            stage holds allow (``nemo_pp.planning.memory.receive_buffer_slots``).
    """

    pp_size: int
    schedule: str | None
    schedule_csv: str | None
    csv_actions: tuple[tuple, ...] | None
    placement: str
    stage_ids: tuple[tuple[int, ...], ...]
    module_fqns: tuple[tuple[str, ...], ...] | None
    microbatch_size: int
    batch_size: int | None
    stage: StageSpec = field(default_factory=StageSpec)
    scale_grads: bool = False
    defer_fsdp_grad_sync: bool = True
    pool_recv_buffers: bool = True

    @property
    def num_stages(self) -> int:
        """Total (virtual) stages over all pp ranks."""
        return sum(len(ids) for ids in self.stage_ids)

    @property
    def stages_per_rank(self) -> int:
        """(Virtual) stages per pp rank: ``num_stages // pp_size`` (above 1 for interleaved and V schedules)."""
        return self.num_stages // self.pp_size

    @property
    def n_microbatches(self) -> int | None:
        """Microbatches per ``schedule.step``; None when ``batch_size`` is unknown."""
        return None if self.batch_size is None else self.batch_size // self.microbatch_size

    @property
    def split_backward(self) -> bool:
        """True when backward is split into input and weight parts (zero-bubble family, or
        a CSV with ``I``/``W`` actions): FSDP2 then needs ``reshard_after_forward=False``."""
        if self.csv_actions is not None:
            split = {"BACKWARD_INPUT", "BACKWARD_WEIGHT"}
            return any(a is not None and a.computation_type.name in split for row in self.csv_actions for a in row)
        return self.schedule in SPLIT_BACKWARD_SCHEDULES

    def stages_of(self, pp_rank: int) -> tuple[int, ...]:
        """Global stage indices held by ``pp_rank``."""
        return self.stage_ids[pp_rank]

    def owner(self, stage: int) -> int:
        """The pp rank holding global stage ``stage``.

        Raises:
            KeyError: no such stage.
        """
        for rank, ids in enumerate(self.stage_ids):
            if stage in ids:
                return rank
        raise KeyError(f"stage {stage} is not in a {self.num_stages}-stage plan")

    def describe(self, param_counts: Sequence[int] | None = None, max_modules_per_stage: int = 16) -> str:
        """A table of stages: global index, owning pp rank, parameters, modules (compressed)."""
        name = self.schedule or "CSV"
        if self.schedule_csv:
            name += f" from {self.schedule_csv}"
        mb = f", {self.n_microbatches} microbatches of {self.microbatch_size}" if self.batch_size is not None else ""
        lines = [f"Pipeline: {self.num_stages} stages over {self.pp_size} pp ranks ({self.placement} placement), "
                 f"schedule {name}{mb}"]
        total = max(1, sum(param_counts)) if param_counts else 1
        for stage in range(self.num_stages):
            head = f"  stage {stage} (pp_rank {self.owner(stage)})"
            if param_counts:
                n = param_counts[stage]
                head += f": {n:,} params ({100 * n / total:.1f}%)"
            lines.append(head)
            shown = compress_layer_names(list(self.module_fqns[stage])) if self.module_fqns else []
            lines += [f"    - {n}" for n in shown[:max_modules_per_stage]]
            if len(shown) > max_modules_per_stage:
                lines.append(f"    ... {len(shown) - max_modules_per_stage} more")
        return "\n".join(lines)


def compress_layer_names(names: list[str]) -> list[str]:
    """``model.layers.0 .. model.layers.14`` -> ``model.layers.0-14`` for display."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush():
        if run:
            prefix, first, last = run[0][0], run[0][1], run[-1][1]
            out.append(f"{prefix}{first}" if len(run) == 1 else f"{prefix}{first}-{last}")
            run.clear()

    for name in names:
        head, _, tail = name.rpartition(".")
        if tail.isdigit():
            if not (run and run[-1][0] == head + "." and int(tail) == run[-1][1] + 1):
                flush()
            run.append((head + ".", int(tail)))
        else:
            flush()
            out.append(name)
    flush()
    return out


def _csv_layout(path: str, pp_size: int, batch_size: int | None, microbatch_size: int):
    rows = read_schedule_csv(path)
    if len(rows) != pp_size:
        raise ValueError(f"{_KEY}.pp_schedule_csv: '{path}' has {len(rows)} rows (one per pp rank) but pp_size is {pp_size}")
    ids = csv_stage_ids(rows)
    num_stages = 1 + max(max(i) for i in ids if i)
    seen = sorted(s for i in ids for s in i)
    if seen != list(range(num_stages)):
        raise ValueError(
            f"{_KEY}.pp_schedule_csv: '{path}' must run every stage 0..{num_stages - 1} on exactly one pp rank; "
            f"rows hold {[list(i) for i in ids]}"
        )
    if batch_size is not None:
        n_mb = microbatch_count(batch_size, microbatch_size)
        used = {a.microbatch_index for row in rows for a in row if a is not None and a.microbatch_index is not None}
        if used != set(range(n_mb)):
            raise ValueError(
                f"{_KEY}.pp_schedule_csv: '{path}' schedules microbatches {sorted(used)} but the batch splits into "
                f"{n_mb} (pp_batch_size {batch_size} / pp_microbatch_size {microbatch_size})"
            )
    return tuple(tuple(r) for r in rows), ids


SPLITS = ("balanced", "uniform", "profile")


def _param_sizes(model: nn.Module) -> PieceCosts:
    """Parameters of each piece: first-stage modules, each layer, last-stage modules (a
    tied embedding counts on both ends: each holds a copy)."""
    def count(module_fqns):
        return sum(p.numel() for p in stage_parameters(model, module_fqns))

    first, last, _ = outer_modules(model)
    _, stack = find_layer_stack(model)
    return PieceCosts(embedding=count(first), head=count(last),
                      layers=tuple(sum(p.numel() for p in layer.parameters()) for layer in stack._modules.values()))


def moe_layers_of(model) -> list[int]:
    """The model's routed MoE layers ([] for a dense model): the cost model counts their active FLOPs."""
    spec = router_spec(model) if hasattr(model, "config") else None
    return moe_layer_indices(model, spec) if spec is not None else []


def _layer_counts(model, num_stages: int, split: str, layers_per_stage, microbatch_size: int, seq_len,
                  piece_costs: PieceCosts | None, max_stage_params: int | None) -> list[int] | None:
    """Layers per stage for the automatic split (None: uniform)."""
    if split not in SPLITS:
        raise ValueError(f"{_KEY}.split must be one of {', '.join(SPLITS)}, got '{split}'")
    config = getattr(model, "config", None)
    if max_stage_params is not None and (split == "uniform" or layers_per_stage is not None):
        raise ValueError(f"{_KEY}.max_stage_params shapes the balanced split: set {_KEY}.split to balanced or "
                         f"profile and {_KEY}.layers_per_stage to null")
    if split == "uniform" or layers_per_stage is not None or config is None:
        return None
    try:
        costs = piece_costs or flop_costs(config, microbatch_size, seq_len or DEFAULT_PLANNING_SEQ_LEN,
                                          moe_layers=moe_layers_of(model))
    except AttributeError:  # not a transformers decoder config: nothing to weigh
        return None
    if len(costs.layers) != len(find_layer_stack(model)[1]):
        return None  # a config that does not describe this layer stack
    if max_stage_params is None:
        return balanced_layer_counts(costs, num_stages)
    try:
        return balanced_layer_counts(costs, num_stages, _param_sizes(model), max_stage_params)
    except ValueError as exc:
        raise ValueError(f"{_KEY}.max_stage_params: {exc} parameters; raise it or add stages") from None


def make_pipeline_plan(
    model: nn.Module | None,
    pp_size: int,
    pp_schedule: str | None = "1f1b",
    pp_schedule_csv: str | None = None,
    pp_microbatch_size: int = 1,
    pp_batch_size: int | None = None,
    layers_per_stage: int | None = None,
    round_virtual_stages_to_pp_multiple: str | None = None,
    module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
    num_stages: int | None = None,
    split: str = "balanced",
    seq_len: int | None = None,
    piece_costs: PieceCosts | None = None,
    max_stage_params: int | None = None,
    stage: StageSpec | None = None,
    scale_grads: bool = False,
    defer_fsdp_grad_sync: bool = True,
    pool_recv_buffers: bool = True,
) -> PipelinePlan:
    """Plan the pipeline: stage count, placement, each stage's modules, microbatches.

    Args:
        model: the full model, real or on the meta device (only its module tree is
            read); None to plan a schedule alone (then ``num_stages``, a CSV or
            ``module_fqns_per_model_part`` gives the stage count).
        pp_size: pipeline-parallel ranks.
        pp_schedule: schedule name, any accepted spelling (``1f1b``, ``interleaved_1f1b``,
            ``zbv``, ...); with a CSV it picks the runtime class, else it may be None.
        pp_schedule_csv: a compute-only CSV schedule; its rows decide the stage count and
            which stages each rank holds. Read here, once.
        pp_microbatch_size: samples per microbatch.
        pp_batch_size: samples per ``schedule.step``; None skips the microbatch checks.
        layers_per_stage: decoder layers per virtual stage (None: one stage per rank for
            GPipe/1F1B, two for the multi-stage schedules).
        round_virtual_stages_to_pp_multiple: ``"up"``/``"down"``/None.
        module_fqns_per_model_part: a manual split, one FQN list per stage.
        num_stages: the stage count, when already known (a schedule for built stages).
        split: how the automatic split places layer boundaries: ``"balanced"`` (default:
            the slowest stage as close to the mean as whole layers allow, by the FLOP
            model of :mod:`.cost`, which counts the output head and the loss),
            ``"profile"`` (the same with ``piece_costs`` timed on the device; without
            them, the FLOP model) or ``"uniform"`` (equal layer counts). ``layers_per_stage`` and a manual split
            override it; a model without a transformers config splits uniformly.
        seq_len: tokens per sample for the cost model (default ``DEFAULT_PLANNING_SEQ_LEN``, 1024; it only moves the
            attention share).
        piece_costs: measured costs to balance with instead of the FLOP model
            (``split: profile``: :func:`.cost.profile_costs`, timed once on one rank and
            shared, so every rank plans the same split).
        max_stage_params: a cap on any stage's parameters for the balanced split (a
            memory budget: parameters, their gradients and optimizer state scale with it).
        stage / scale_grads / defer_fsdp_grad_sync / pool_recv_buffers: carried into the plan unchanged (see
            :class:`PipelinePlan`); ``stage`` defaults to ``StageSpec()``.

    Returns:
        the :class:`PipelinePlan`.

    Raises:
        ValueError: every impossible combination, naming the config key and the fix
            (see :func:`check_schedule_constraints`, :func:`calculate_virtual_stages`,
            :func:`validate_stage_modules`).
        FileNotFoundError: the CSV file does not exist.
    """
    if int(pp_size) < 1:
        raise ValueError(f"distributed.pp_size must be >= 1, got {pp_size}")
    if int(pp_microbatch_size) < 1:
        raise ValueError(f"{_KEY}.pp_microbatch_size must be >= 1, got {pp_microbatch_size}")
    name = canonical_schedule_name(pp_schedule) if pp_schedule else None
    csv_actions = None
    if pp_schedule_csv:
        csv_actions, stage_ids = _csv_layout(str(pp_schedule_csv), pp_size, pp_batch_size, pp_microbatch_size)
        if name is not None and not runs_action_lists(name):
            name = None  # the CSV runs on torch's runtime; a GPipe/1F1B name (a default) does not apply
        placement = "csv"
        n = sum(len(i) for i in stage_ids)
    else:
        if name is None:
            raise ValueError(f"set {_KEY}.pp_schedule (e.g. 1f1b) or {_KEY}.pp_schedule_csv")
        if module_fqns_per_model_part:
            n = len(module_fqns_per_model_part)
        elif num_stages is not None:
            n = int(num_stages)
        else:
            if model is None:
                raise ValueError("make_pipeline_plan needs the model, num_stages or module_fqns_per_model_part")
            _, layers = find_layer_stack(model)
            n, _ = calculate_virtual_stages(
                len(layers), layers_per_stage, pp_size, is_single_stage_schedule(name), round_virtual_stages_to_pp_multiple
            )
        if pp_batch_size is not None:
            check_schedule_constraints(name, pp_size, n, int(pp_batch_size), int(pp_microbatch_size))
        else:
            check_stage_layout(name, pp_size, n)
        placement = schedule_style(name)
        stage_ids = tuple(stage_ids_this_rank(r, pp_size, n, placement) for r in range(pp_size))
    if module_fqns_per_model_part and len(module_fqns_per_model_part) != n:
        raise ValueError(
            f"{_KEY}.module_fqns_per_model_part has {len(module_fqns_per_model_part)} stages but the schedule runs {n}"
        )
    module_fqns = None
    if model is not None:
        if module_fqns_per_model_part:
            names = [list(m) for m in module_fqns_per_model_part]
        else:
            names = auto_stage_module_names(model, n, _layer_counts(
                model, n, split, layers_per_stage, pp_microbatch_size, seq_len, piece_costs, max_stage_params))
        module_fqns = tuple(tuple(m) for m in validate_stage_modules(model, names))
    return PipelinePlan(
        pp_size=int(pp_size), schedule=name, schedule_csv=str(pp_schedule_csv) if pp_schedule_csv else None,
        csv_actions=csv_actions, placement=placement, stage_ids=tuple(tuple(i) for i in stage_ids),
        module_fqns=module_fqns, microbatch_size=int(pp_microbatch_size),
        batch_size=None if pp_batch_size is None else int(pp_batch_size),
        stage=stage if stage is not None else StageSpec(), scale_grads=bool(scale_grads),
        defer_fsdp_grad_sync=bool(defer_fsdp_grad_sync), pool_recv_buffers=bool(pool_recv_buffers),
    )
