"""NeMo AutoModel's ``functional`` module, name for name: a façade over the plan and the builder.

Each function turns its arguments into a :class:`~nemo_pp.planning.pipeline.PipelinePlan`
(:func:`~nemo_pp.planning.pipeline.make_pipeline_plan`, which checks them) and builds from
it (:mod:`.build`), the same path :meth:`AutoPipeline.from_plan` takes. The building
blocks (stage ids, virtual stages, FQN tables, shapes) are re-exported under NeMo's names.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from torch import nn

from nemo_pp.distributed.grads import divide_grads
from nemo_pp.distributed.pipelining.build import build_pipeline, build_schedule, build_stages, pp_submesh
from nemo_pp.distributed.pipelining.shapes import (  # noqa: F401  (NeMo's names)
    _get_hidden_and_vocab_size,
    _precompute_stage_shapes,
    reset_pp_stage_shapes,
)
from nemo_pp.models.module_tree import copy_pruned  # noqa: F401  (re-exported)
from nemo_pp.models.stage_forward import make_stage_emit_tensor as _wrap_stage_forward_to_emit_tensor  # noqa: F401
from nemo_pp.planning.checks import check_grad_sync_options
from nemo_pp.planning.pipeline import StageSpec, make_pipeline_plan
from nemo_pp.planning.schedules import (  # noqa: F401  (re-exported)
    SCHEDULE_NAMES,
    V_STYLE_SCHEDULES,
    canonical_schedule_name,
    check_schedule_constraints,
    is_single_stage_schedule,
    schedule_style,
)
from nemo_pp.planning.split import (  # noqa: F401  (re-exported)
    calculate_virtual_stages,
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
    """``module.name`` if it is callable, else None (hooks a model may or may not define)."""
    hook = getattr(module, name, None)
    return hook if callable(hook) else None


def scale_grads_by_divisor(stages: list, divisor: float) -> None:
    """Divide every gradient of the local stages by ``divisor`` (e.g. label tokens)."""
    divide_grads([stage.submod for stage in stages], divisor)


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
    mesh = pp_submesh(pp_mesh, pp_axis_name)
    plan = make_pipeline_plan(
        model, mesh.size(), pp_schedule, pp_schedule_csv, layers_per_stage=layers_per_stage,
        round_virtual_stages_to_pp_multiple=round_to_pp_multiple, module_fqns_per_model_part=module_names_per_stage,
        stage=StageSpec(patch_inner_model=patch_inner_model, patch_causal_lm_model=patch_causal_lm_model),
    )
    return build_stages(model, plan, mesh.get_local_rank(), mesh.get_group(), device)


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
    stay False: see :func:`check_grad_sync_options`. ``moe_mesh`` and the ``ep_*`` names
    are passed to ``parallelize_fn`` as they are.

    Returns:
        ``(schedule, model_parts, has_first_stage, has_last_stage, stages)``.

    Raises:
        ValueError: see :func:`make_pipeline_plan` and :func:`check_grad_sync_options`.
    """
    check_grad_sync_options(patch_stage_backward_maybe_with_nosync, reduce_grad_per_microbatch)
    plan = make_pipeline_plan(
        model, pp_submesh(world_mesh, pp_axis_name).size(), pipeline_parallel_schedule,
        pipeline_parallel_schedule_csv, microbatch_size, local_batch_size, layers_per_stage, round_to_pp_multiple,
        module_fqns_per_model_part, scale_grads=scale_grads,
        stage=StageSpec(patch_inner_model=patch_inner_model, patch_causal_lm_model=patch_causal_lm_model,
                        activation_dtype=tensor_dtype, seq_len=seq_len),
    )
    return build_pipeline(
        model, plan, world_mesh, moe_mesh, pp_axis_name, device, loss_fn, parallelize_fn,
        dict(dp_axis_names=dp_axis_names, cp_axis_name=cp_axis_name, tp_axis_name=tp_axis_name,
             ep_axis_name=ep_axis_name, ep_shard_axis_names=ep_shard_axis_names),
    )
