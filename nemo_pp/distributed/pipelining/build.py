"""Materialise a :class:`PipelinePlan` on one pp rank: its stage modules, their
``PipelineStage`` objects, the schedule, and the parallelize_fn call per stage."""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from nemo_pp.models.loading import materialize

from .._torch_compat import NemoPipelineStage, load_schedule_actions, runtime_schedule_class
from .plan import PipelinePlan
from .split import copy_pruned

logger = logging.getLogger(__name__)


def build_stages(
    model: nn.Module,
    plan: PipelinePlan,
    pp_rank: int,
    pp_group,
    device: torch.device,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    weights=None,
) -> tuple[list, list[nn.Module]]:
    """Copy this rank's stages out of ``model`` (pruned copies, original FQNs) and wrap them.

    Args:
        model: the full model: real weights, or meta-device parameters (then each stage is
            materialised on ``device`` and ``weights`` fills it: only this rank's tensors
            are ever allocated or read).
        plan: the pipeline plan (its ``module_fqns`` must be set).
        pp_rank / pp_group: this rank's index in, and the process group of, the pp axis.
        device: where the stage modules go.
        patch_inner_model / patch_causal_lm_model: install the tensor-returning forwards
            of ``hf_utils``; with neither, ``ModelOutput`` results are unwrapped to tensors.
        weights: for a meta-device model, an object with ``load_into(module)`` (e.g.
            ``nemo_pp.models.loading.SafetensorsCheckpoint``).

    Returns:
        ``(stages, model_parts)`` for ``plan.stages_of(pp_rank)``, in that order.

    Raises:
        ValueError: a meta-device model without ``weights``.
    """
    from .hf_utils import make_stage_emit_tensor, patch_hf_model_for_pp

    if plan.module_fqns is None:
        raise ValueError("build_stages needs a plan made with the model (module_fqns is None)")
    stages, parts = [], []
    for stage_idx in plan.stages_of(pp_rank):
        part = copy_pruned(model, plan.module_fqns[stage_idx])
        if patch_inner_model or patch_causal_lm_model:
            patch_hf_model_for_pp(part, patch_inner_model, patch_causal_lm_model)
        make_stage_emit_tensor(part)
        part._pp_stage_index = stage_idx
        part._pp_module_fqns = list(plan.module_fqns[stage_idx])
        if any(p.is_meta for p in part.parameters()):
            if weights is None:
                raise ValueError("the model has meta-device parameters: pass weights= (a SafetensorsCheckpoint) to load them")
            materialize(part, device)
            weights.load_into(part)
        else:
            part.to(device)
        stages.append(NemoPipelineStage(part, stage_idx, plan.num_stages, device, group=pp_group))
        parts.append(part)
    logger.info("pp_rank %d holds stages %s of %d", pp_rank, list(plan.stages_of(pp_rank)), plan.num_stages)
    return stages, parts


def call_parallelize_fn(parallelize_fn: Callable, part: nn.Module, world_mesh, moe_mesh, **kwargs) -> None:
    """Call ``parallelize_fn(part, world_mesh, moe_mesh, **kwargs)`` with only the keyword
    arguments it accepts, so a function written like the reference's examples
    (``def fn(model, world_mesh, moe_mesh, *, dp_axis_names, ...)`` without ``**kwargs``)
    works; a function with ``**kwargs`` receives them all."""
    try:
        params = inspect.signature(parallelize_fn).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        params = None
    if params is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    parallelize_fn(part, world_mesh, moe_mesh, **kwargs)


def build_schedule(plan: PipelinePlan, stages: list, loss_fn: Callable | None, scale_grads: bool = False):
    """The torch schedule object of ``plan`` for this rank's ``stages``.

    A CSV plan runs on torch's runtime schedule with the plan's parsed actions (the
    file is not read again); a named plan uses ``get_schedule_class``.

    Raises:
        ValueError: the plan has no batch size, or torch rejects the CSV's actions.
    """
    n_mb = plan.n_microbatches
    if n_mb is None:
        raise ValueError("building a schedule needs the plan's pp_batch_size")
    if plan.csv_actions is not None:
        cls = runtime_schedule_class(get_schedule_class(plan.schedule) if plan.schedule else None)
        try:
            schedule = cls(stages, n_microbatches=n_mb, loss_fn=loss_fn, scale_grads=scale_grads)
            load_schedule_actions(schedule, plan.csv_actions)
        except Exception as exc:  # torch raises assorted errors on inconsistent rows
            raise ValueError(
                f"distributed.pipeline.pp_schedule_csv: '{plan.schedule_csv}' is not a runnable schedule: {exc}"
            ) from exc
        return schedule
    cls = get_schedule_class(plan.schedule)
    if issubclass(cls, PipelineScheduleSingle):
        schedule = cls(stages[0], n_microbatches=n_mb, loss_fn=loss_fn, scale_grads=scale_grads)
    else:
        schedule = cls(stages, n_microbatches=n_mb, loss_fn=loss_fn, scale_grads=scale_grads)
    logger.info("built %s schedule: %d stages over %d ranks, %d microbatches of %d",
                plan.schedule, plan.num_stages, plan.pp_size, n_mb, plan.microbatch_size)
    return schedule
