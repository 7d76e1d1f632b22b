"""Model-agnostic pipelining building blocks (NeMo AutoModel's ``functional`` module, name for name).

The pieces live in small modules (``split``, ``schedules``, ``shapes``); this module
is their public namespace plus :func:`pipeline_model`, which composes them.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from torch import nn

from ..grads import divide_grads
from .build import build_schedule, build_stages, call_parallelize_fn
from .hf_utils import make_stage_emit_tensor as _wrap_stage_forward_to_emit_tensor  # noqa: F401  (NeMo's name)
from .plan import PipelinePlan, make_pipeline_plan
from .schedules import (  # noqa: F401  (re-exported)
    SCHEDULE_NAMES,
    V_STYLE_SCHEDULES,
    canonical_schedule_name,
    check_schedule_constraints,
    is_single_stage_schedule,
    schedule_style,
)
from .shapes import _get_hidden_and_vocab_size, _precompute_stage_shapes, reset_pp_stage_shapes  # noqa: F401
from .split import (  # noqa: F401
    calculate_virtual_stages,
    copy_pruned,
    generate_hf_model_fqn_per_model_part,
    stage_ids_this_rank,
)

logger = logging.getLogger(__name__)


class ParallelizeFnProtocol(Protocol):
    """Applies TP / FSDP / activation checkpointing to ONE model part, in place.

    Called once per model part after the split and before the schedule is built.
    """

    def __call__(
        self,
        model: nn.Module,
        world_mesh,
        moe_mesh,
        *,
        pp_enabled: bool,
        dp_axis_names: tuple[str, ...],
        cp_axis_name: str | None = None,
        tp_axis_name: str | None = None,
        ep_axis_name: str | None = None,
        ep_shard_axis_names: tuple[str, ...] | None = None,
    ) -> None: ...


def _get_optional_hook(module: object, name: str) -> Callable | None:
    """``module.name`` if it is callable, else None (hooks models may or may not define)."""
    hook = getattr(module, name, None)
    return hook if callable(hook) else None


def scale_grads_by_divisor(stages: list, divisor: float) -> None:
    """Divide every gradient of the local stages by ``divisor`` (e.g. label tokens)."""
    divide_grads([stage.submod for stage in stages], divisor)


def _pp_mesh(world_mesh, pp_axis_name: str):
    if world_mesh.mesh_dim_names and pp_axis_name in world_mesh.mesh_dim_names and world_mesh.ndim > 1:
        return world_mesh[pp_axis_name]
    return world_mesh


def split_model_into_stages(
    model: nn.Module,
    pp_mesh,
    pp_axis_name: str,
    pp_schedule: str,
    device: torch.device,
    module_names_per_stage: list[list[str]] | None = None,
    layers_per_stage: int | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    round_to_pp_multiple: str | None = None,
    pp_schedule_csv: str | None = None,
):
    """Split ``model`` into this rank's pipeline stages (plans with :func:`make_pipeline_plan`).

    Args:
        model: the full model (real weights or meta tensors).
        pp_mesh: the pipeline DeviceMesh (1-D, or a mesh with ``pp_axis_name``).
        pp_axis_name: name of the pipeline axis.
        pp_schedule: schedule name; decides stages per rank and loop/V placement.
        device: device for the stage models.
        module_names_per_stage: manual FQN lists, one per (virtual) stage; else read from
            the model's module tree.
        layers_per_stage: decoder layers per virtual stage (None: automatic).
        patch_inner_model / patch_causal_lm_model: see ``hf_utils.patch_hf_model_for_pp``.
        round_to_pp_multiple: ``"up"``/``"down"``/None, see :func:`calculate_virtual_stages`.
        pp_schedule_csv: a CSV schedule; its rows fix the stage count and placement.

    Returns:
        ``(stages, models)``: this rank's ``PipelineStage`` objects and their modules.

    Raises:
        ValueError: see :func:`make_pipeline_plan`.
    """
    mesh = _pp_mesh(pp_mesh, pp_axis_name)
    plan = make_pipeline_plan(
        model, mesh.size(), pp_schedule, pp_schedule_csv, layers_per_stage=layers_per_stage,
        round_virtual_stages_to_pp_multiple=round_to_pp_multiple, module_fqns_per_model_part=module_names_per_stage,
    )
    return build_stages(model, plan, mesh.get_local_rank(), mesh.get_group(), device, patch_inner_model, patch_causal_lm_model)


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
        pipeline_parallel_schedule_csv: a compute-only CSV schedule, or None.
        pipeline_parallel_schedule: schedule name (see :data:`SCHEDULE_NAMES`).
        microbatch_size: samples per microbatch.
        local_batch_size: samples per ``step()``.
        stages: this rank's ``PipelineStage`` objects.
        loss_fn: ``loss_fn(output, target) -> scalar`` run on the last stage.
        scale_grads: let torch divide ALL grads by the microbatch count after each step
            (wrong under gradient accumulation across steps; keep False and normalise
            by label tokens).

    Raises:
        ValueError / FileNotFoundError: see :func:`make_pipeline_plan`.
    """
    plan = make_pipeline_plan(
        None, stages[0].group_size, pipeline_parallel_schedule, pipeline_parallel_schedule_csv,
        microbatch_size, local_batch_size, num_stages=stages[0].num_stages,
    )
    return build_schedule(plan, stages, loss_fn, scale_grads)


def pipeline_from_plan(
    model: nn.Module,
    plan: PipelinePlan,
    world_mesh,
    moe_mesh=None,
    pp_axis_name: str = "pp",
    device: torch.device | None = None,
    loss_fn: Callable | None = None,
    parallelize_fn: Callable | None = None,
    parallelize_kwargs: dict | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    scale_grads: bool = False,
    seq_len: int | None = None,
    tensor_dtype: torch.dtype | None = None,
    weights=None,
):
    """Build this rank's part of ``plan``: stages (materialised and loaded from ``weights``
    when ``model`` is on the meta device), ``parallelize_fn`` per part, schedule, static
    shapes (when ``seq_len`` is given).

    Returns:
        ``(schedule, model_parts, has_first_stage, has_last_stage, stages)``.
    """
    mesh = _pp_mesh(world_mesh, pp_axis_name)
    if mesh.size() != plan.pp_size:
        raise ValueError(f"the plan is for pp_size {plan.pp_size} but the mesh's '{pp_axis_name}' axis has {mesh.size()}")
    device = device if device is not None else torch.device("cpu")
    stages, parts = build_stages(model, plan, mesh.get_local_rank(), mesh.get_group(), device,
                                 patch_inner_model, patch_causal_lm_model, weights)
    if parallelize_fn is not None:
        for part in parts:
            call_parallelize_fn(parallelize_fn, part, world_mesh, moe_mesh, pp_enabled=plan.pp_size > 1,
                                **(parallelize_kwargs or {}))
    schedule = build_schedule(plan, stages, loss_fn, scale_grads)
    config = getattr(model, "config", None)
    if seq_len is not None and config is not None:
        _precompute_stage_shapes(stages, config, plan.microbatch_size, seq_len, tensor_dtype)
    return schedule, parts, any(s.is_first for s in stages), any(s.is_last for s in stages), stages


def pipeline_model(
    model: nn.Module,
    world_mesh,
    moe_mesh,
    pp_axis_name: str,
    dp_axis_names: tuple[str, ...],
    cp_axis_name: str | None = None,
    tp_axis_name: str | None = None,
    ep_axis_name: str | None = None,
    ep_shard_axis_names: tuple[str, ...] | None = None,
    layers_per_stage: int | None = None,
    pipeline_parallel_schedule_csv: str | None = None,
    pipeline_parallel_schedule: str | None = None,
    microbatch_size: int = 1,
    local_batch_size: int = 1,
    device: torch.device | None = None,
    loss_fn: Callable | None = None,
    parallelize_fn: Callable | None = None,
    module_fqns_per_model_part: list[list[str]] | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    scale_grads: bool = False,
    round_to_pp_multiple: str | None = None,
    patch_stage_backward_maybe_with_nosync: bool = False,
    reduce_grad_per_microbatch: bool = False,
    seq_len: int | None = None,
    tensor_dtype: torch.dtype | None = None,
):
    """Plan, split, parallelize and schedule a model in one call.

    ``patch_stage_backward_maybe_with_nosync`` and ``reduce_grad_per_microbatch`` must
    stay False: see :func:`check_grad_sync_options`.

    Returns:
        ``(schedule, model_parts, has_first_stage, has_last_stage, stages)``.

    Raises:
        ValueError: see :func:`make_pipeline_plan` and :func:`check_grad_sync_options`.
    """
    check_grad_sync_options(patch_stage_backward_maybe_with_nosync, reduce_grad_per_microbatch)
    plan = make_pipeline_plan(
        model, _pp_mesh(world_mesh, pp_axis_name).size(), pipeline_parallel_schedule, pipeline_parallel_schedule_csv,
        microbatch_size, local_batch_size, layers_per_stage, round_to_pp_multiple, module_fqns_per_model_part,
    )
    return pipeline_from_plan(
        model, plan, world_mesh, moe_mesh, pp_axis_name, device, loss_fn, parallelize_fn,
        dict(dp_axis_names=dp_axis_names, cp_axis_name=cp_axis_name, tp_axis_name=tp_axis_name,
             ep_axis_name=ep_axis_name, ep_shard_axis_names=ep_shard_axis_names),
        patch_inner_model, patch_causal_lm_model, scale_grads, seq_len, tensor_dtype,
    )


def check_grad_sync_options(
    patch_stage_backward_maybe_with_nosync: bool = False,
    reduce_grad_per_microbatch: bool = False,
) -> None:
    """Refuse the reference's gradient-sync switches that torch's own PipelineStage makes moot.

    torch's ``PipelineStage`` (read and measured on 2.13) already runs every microbatch's backward without FSDP
    gradient sync and reduces once per step in its ``REDUCE_GRAD`` action
    (``PipelineStage.backward_maybe_with_nosync`` / ``perform_reduce_grad``), which is
    what the reference's patch adds. (``defer_fsdp_grad_sync`` goes further, across the
    batches of one optimizer step: see ``AutoPipeline.set_grad_sync``.)

    Raises:
        ValueError: a non-default value, naming the key and the reason.
    """
    key = "distributed.pipeline"
    if patch_stage_backward_maybe_with_nosync:
        raise ValueError(
            f"{key}.patch_stage_backward_maybe_with_nosync: true is not needed: torch's PipelineStage already skips "
            "FSDP gradient sync on all but the step's last backward and reduces once (REDUCE_GRAD); remove it or set false"
        )
    if reduce_grad_per_microbatch:
        raise ValueError(
            "reduce_grad_per_microbatch=True is not supported: gradients are reduced once per step after the last "
            "microbatch (torch's REDUCE_GRAD); per-microbatch reduction would only add communication"
        )
