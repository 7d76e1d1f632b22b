"""Materialise a :class:`PipelinePlan` on one pp rank: its stage modules, their
``PipelineStage`` objects, the schedule, and the parallelize_fn call per stage."""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from nemo_pp._torch_compat import NemoPipelineStage, load_schedule_actions, runtime_schedule_class
from nemo_pp.distributed.pipelining.shapes import _precompute_stage_shapes
from nemo_pp.models.lm_head import check_head_loss, install_head_loss, stage_computed_loss, takes_hidden_states
from nemo_pp.models.loading import materialize
from nemo_pp.models.module_tree import copy_pruned
from nemo_pp.models.stage_forward import make_stage_emit_tensor, patch_hf_model_for_pp
from nemo_pp.planning.memory import receive_buffer_slots
from nemo_pp.planning.pipeline import PipelinePlan

logger = logging.getLogger(__name__)


def build_stages(
    model: nn.Module,
    plan: PipelinePlan,
    pp_rank: int,
    pp_group,
    device: torch.device,
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
            Its ``stage`` spec says which forwards to install (``patch_inner_model`` /
            ``patch_causal_lm_model``; with neither, ``ModelOutput`` results are unwrapped
            to tensors) and for how many sequence shards.
        weights: for a meta-device model, an object with ``load_into(module)`` (e.g.
            ``nemo_pp.models.loading.SafetensorsCheckpoint``).

    Returns:
        ``(stages, model_parts)`` for ``plan.stages_of(pp_rank)``, in that order.

    Raises:
        ValueError: a meta-device model without ``weights``.
    """
    if plan.module_fqns is None:
        raise ValueError("build_stages needs a plan made with the model (module_fqns is None)")
    stages, parts = [], []
    for stage_idx in plan.stages_of(pp_rank):
        part = copy_pruned(model, plan.module_fqns[stage_idx])
        spec = plan.stage
        if spec.patch_inner_model or spec.patch_causal_lm_model:
            patch_hf_model_for_pp(part, spec.patch_inner_model, spec.patch_causal_lm_model, spec.sequence_shards)
        make_stage_emit_tensor(part)
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


def build_pipeline(
    model: nn.Module,
    plan: PipelinePlan,
    world_mesh,
    moe_mesh=None,
    pp_axis_name: str = "pp",
    device: torch.device | None = None,
    loss_fn: Callable | None = None,
    parallelize_fn: Callable | None = None,
    parallelize_kwargs: dict | None = None,
    weights=None,
):
    """This rank's part of ``plan``, trusting it (nothing is validated again): stages
    (materialised and loaded from ``weights`` when ``model`` is on the meta device),
    ``parallelize_fn`` per part, the schedule, and static shapes when ``plan.stage.seq_len``
    is set. A ``loss_fn`` that takes hidden states (``FusedLinearCrossEntropy``) is installed
    on the last stage, which then returns its loss when the schedule passes ``labels=``.

    Returns:
        ``(schedule, model_parts, has_first_stage, has_last_stage, stages)``.

    Raises:
        ValueError: the mesh's pp axis is not the plan's pp size; a hidden-states ``loss_fn``
            the model cannot feed (:func:`nemo_pp.models.lm_head.check_head_loss`).
    """
    mesh = pp_submesh(world_mesh, pp_axis_name)
    if mesh.size() != plan.pp_size:
        raise ValueError(f"the plan is for pp_size {plan.pp_size} but the mesh's '{pp_axis_name}' axis has {mesh.size()}")
    device = device if device is not None else torch.device("cpu")
    if takes_hidden_states(loss_fn):  # on the whole model, alike on every rank, before any weight is read
        check_head_loss(model, patch_causal_lm_model=plan.stage.patch_causal_lm_model)
    stages, parts = build_stages(model, plan, mesh.get_local_rank(), mesh.get_group(), device, weights)
    if parallelize_fn is not None:
        for part in parts:
            call_parallelize_fn(parallelize_fn, part, world_mesh, moe_mesh, pp_enabled=plan.pp_size > 1,
                                **(parallelize_kwargs or {}))
    slots = receive_buffer_slots(plan)
    for stage in stages if slots is not None else ():
        stage.recv_pool_slots = slots[stage.stage_index]
    if takes_hidden_states(loss_fn):
        # the last stage computes the loss in its own forward (nemo_pp.models.lm_head)
        for stage, part in zip(stages, parts):
            if stage.is_last:
                install_head_loss(part, loss_fn)
        loss_fn = stage_computed_loss
    schedule = build_schedule(plan, stages, loss_fn, plan.scale_grads)
    config = getattr(model, "config", None)
    spec = plan.stage
    if spec.seq_len is not None and config is not None:
        _precompute_stage_shapes(stages, config, plan.microbatch_size, spec.seq_len, spec.activation_dtype,
                                 spec.sequence_shards)
    return schedule, parts, any(s.is_first for s in stages), any(s.is_last for s in stages), stages


def pp_submesh(world_mesh, pp_axis_name: str = "pp"):
    """The 1D pipeline mesh of ``world_mesh`` (itself when it is 1D or has no such axis)."""
    if world_mesh.mesh_dim_names and pp_axis_name in world_mesh.mesh_dim_names and world_mesh.ndim > 1:
        return world_mesh[pp_axis_name]
    return world_mesh
