"""Preflight: does the planned layout fit in the device's memory? Said before any weight is read.

The recipe calls :func:`fit_warning` once the device is known. It weighs the run's own
layout with the search's memory model (:class:`~nemo_pp.planning.layout_memory.ModelMemory`)
and, where the fullest rank would not fit, says so with what would: the largest microbatch
that fits, else activation checkpointing, else the nearest layout of the same world size
that fits (fewest axes changed). A warning, not an error: the model is an estimate, and on a
CPU the limit is host memory shared by the node's ranks.
"""

from __future__ import annotations

import dataclasses

from nemo_pp.planning.devices import GIB
from nemo_pp.planning.layout import Layout
from nemo_pp.planning.layout_memory import ModelMemory

__all__ = ["fit_warning", "layout_of_plan", "preflight_fit_warning"]


def layout_of_plan(plan) -> Layout | None:
    """The :class:`Layout` a :class:`~nemo_pp.planning.run_plan.RunPlan` runs, or None for a CSV schedule."""
    p, s = plan.pipeline, plan.sizes
    if p.schedule is None or p.batch_size is None:
        return None
    return Layout(pp=s.pp, dp_replicate=s.dp_replicate, dp_shard=s.dp_shard, cp=s.cp, tp=s.tp, ep=s.ep,
                  sequence_parallel=s.sequence_parallel, schedule=p.schedule, num_stages=p.num_stages,
                  layers_per_stage=plan.pipeline_kwargs.get("layers_per_stage"), microbatch_size=p.microbatch_size,
                  local_batch_size=p.batch_size, grad_acc_steps=plan.grad_acc_steps,
                  activation_checkpointing=plan.activation_checkpointing)


def _fits(memory: ModelMemory, layout: Layout, seq_len: int, limit: int, reserved: int) -> tuple[bool, int]:
    try:
        need = max(m.total_bytes for m in memory.rank_memory(layout, seq_len, reserved))
    except ValueError:  # the schedule cannot run this shape
        return False, 0
    return need <= limit, need


def preflight_fit_warning(plan, cfg, device, ranks_per_node: int) -> str | None:
    """:func:`fit_warning` for the run the recipe is starting on ``device``: one rank's memory
    (:func:`~nemo_pp.planning.devices.rank_memory_limit`) at the plan's sequence length. Every
    rank computes it (the same meta-device numbers), so anything it raises stops all alike."""
    from nemo_pp.planning.cost import DEFAULT_PLANNING_SEQ_LEN
    from nemo_pp.planning.devices import rank_memory_limit
    from nemo_pp.planning.run_plan import planning_seq_len

    limit, reserved = rank_memory_limit(device, ranks_per_node)
    seq_len = planning_seq_len(cfg) or DEFAULT_PLANNING_SEQ_LEN
    return fit_warning(plan, cfg, seq_len, limit, reserved, ranks_per_node)


def fit_warning(plan, cfg, seq_len: int, limit_bytes: int, reserved_bytes: int, gpus_per_node: int) -> str | None:
    """The warning to print when ``plan``'s fullest rank needs more than ``limit_bytes``, or None
    (also for a CSV schedule and for a model the memory model does not weigh,
    :meth:`ModelMemory.supports`).

    Args:
        plan: the run's :class:`~nemo_pp.planning.run_plan.RunPlan`.
        cfg: its config (the loss, optimizer and split it names).
        seq_len: tokens per sample the run pads to at most.
        limit_bytes: memory of one rank (a GPU's; on a CPU host memory over the node's ranks).
        reserved_bytes: what the process needs beyond its tensors.
        gpus_per_node: ranks per node.
    """
    from nemo_pp.planning.search import enumerate_layouts

    if plan.meta_model is None or not ModelMemory.supports(plan.meta_model):
        return None
    layout = layout_of_plan(plan)
    if layout is None:
        return None
    memory = ModelMemory.for_config(plan.meta_model, cfg, seq_len)
    fits, need = _fits(memory, layout, seq_len, limit_bytes, reserved_bytes)
    if fits:
        return None
    head = (f"memory: the plan predicts {need / GIB:.1f} GiB on the fullest rank, more than the "
            f"{limit_bytes / GIB:.1f} GiB it has (layout {layout.describe()}, {seq_len} tokens per sample)")
    if layout.pp > 1:
        for mb in range(layout.microbatch_size - 1, 0, -1):
            smaller = dataclasses.replace(layout, microbatch_size=mb)
            if layout.local_batch_size % mb == 0 and _fits(memory, smaller, seq_len, limit_bytes, reserved_bytes)[0]:
                return f"{head}; the largest microbatch that fits: --distributed.pipeline.pp_microbatch_size {mb}"
    if not layout.activation_checkpointing:
        ckpt = dataclasses.replace(layout, activation_checkpointing=True)
        if _fits(memory, ckpt, seq_len, limit_bytes, reserved_bytes)[0]:
            return f"{head}; it fits with --distributed.activation_checkpointing true"
    gbs = layout.local_batch_size * layout.sizes.dp * layout.grad_acc_steps
    axes = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "schedule", "num_stages", "microbatch_size",
            "activation_checkpointing")
    best = None
    for other in enumerate_layouts(cfg, plan.meta_model, layout.sizes.world_size, gpus_per_node, seq_len, gbs):
        changed = sum(getattr(other, a) != getattr(layout, a) for a in axes)
        if (best is None or changed < best[0]) and _fits(memory, other, seq_len, limit_bytes, reserved_bytes)[0]:
            best = (changed, other)
    if best is None:
        return f"{head}; no layout of {layout.sizes.world_size} ranks fits: add ranks or shorten the sequences"
    return (f"{head}; the nearest layout that fits is {best[1].describe()}: "
            + " ".join(best[1].overrides(gbs)) + " (nemo-pp plan ranks them by step time)")
