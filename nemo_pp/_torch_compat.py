"""The one place in nemo_pp that touches private torch names.

Private names used (each behind a function below, so a torch upgrade is mended here):

* ``DeviceMesh._flatten`` (the flattened dp / dp_shard_cp / dp_cp views) and slicing a
  flattened axis from the root mesh (HSDP x CP);
* ``torch.distributed.pipelining.schedules``: ``_Action``, ``_ComputationType``,
  ``_PipelineScheduleRuntime`` and its ``pipeline_order`` loading, the single-stage
  schedules' ``_stage`` / ``_n_microbatches``, and ``_schedule_visualizer.get_schedule_ops``;
* the stage-metadata attributes described next.

Static stage metadata (shapes known up front, no shape-inference forward) and the
reset that a new sequence length needs both depend on private names that changed
between torch releases:

* torch >= 2.12 ("new API"): stages carry ``_user_meta`` (a ``_StageMeta``) and an
  ``_inference_mode`` decided by a P2P vote at initialisation; schedules carry
  ``_stage_forward_initialized/_stage_backward_initialized`` (single-stage) or
  ``_stages_forward_initialized/_stages_backward_initialized`` (multi-stage).
* torch 2.11 ("old API"): stages carry ``inputs_meta`` and ``_outputs_meta``
  (set through ``_configure_outputs_meta``); schedules carry ``_stage_initialized``
  (single) or ``_stages_initialized`` (multi).

Everything else in nemo_pp goes through the functions below.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as _schedules

#: One scheduled action (``stage``, ``computation_type``, ``microbatch``), e.g. ``1F0``.
Action = _schedules._Action
#: FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, ... of an :data:`Action`.
ComputationType = _schedules._ComputationType

__all__ = [
    "STAGE_META_API",
    "Action",
    "ComputationType",
    "action_from_str",
    "flatten_mesh",
    "slice_with_flattened",
    "load_schedule_actions",
    "runtime_schedule_class",
    "single_stage_schedule_shape",
    "schedule_action_lists",
    "run_schedule",
    "NemoPipelineStage",
    "set_static_stage_meta",
    "mark_schedule_uninitialized",
    "stage_uses_static_meta",
]


def _detect_api() -> str:
    try:
        from torch.distributed.pipelining._utils import _StageMeta  # noqa: F401
    except ImportError:
        return "old"
    return "new"


#: ``"new"`` (torch >= 2.12, ``_user_meta``) or ``"old"`` (torch 2.11, ``inputs_meta``).
STAGE_META_API = _detect_api()


def _pool_recv_buffers(infos_by_microbatch: dict, slots: int) -> None:
    """Make microbatch ``i``'s receive buffers share the memory of microbatch ``i mod slots``'s.

    torch allocates one receive buffer per microbatch and keeps them all
    (``_prepare_forward_infra``, ``_setup_backward_recv_info``). A received activation is
    the stage's input leaf, saved by autograd until that microbatch's backward, so a slot can
    take the next microbatch only once the schedule has run that backward: ``slots`` must
    exceed the microbatches a stage holds at once (the plan's ``in_flight``), as the
    reference's ring pool for 1F1B does. Each microbatch keeps its own tensor object (its own
    ``.grad``, which torch reads and clears per backward), sharing the slot's storage.
    """
    first: dict = {}
    for mb in sorted(infos_by_microbatch):
        for k, info in enumerate(infos_by_microbatch[mb]):
            buf = getattr(info, "buffer", None)
            if getattr(info, "is_root_arg", False) or buf is None:
                continue
            base = first.setdefault((mb % slots, k), buf)
            if base is not buf:
                shared = torch.empty(0, dtype=base.dtype, device=base.device)
                shared.set_(base.untyped_storage(), base.storage_offset(), base.shape, base.stride())
                info.buffer = shared.requires_grad_(buf.requires_grad)


class NemoPipelineStage(PipelineStage):
    """``PipelineStage`` that keeps accumulated gradients across a re-initialisation and
    can defer FSDP gradient reduction to the last batch of an optimizer step.

    torch 2.13 wipes every FSDP parameter's ``.grad`` after stage initialisation,
    because a *dynamic* initialisation runs a real forward/backward whose gradients
    are garbage. With static metadata no such pass runs, so the wipe would only
    destroy gradients accumulated before a sequence-length change (docs/architecture.md, "Measured torch facts").

    torch runs every microbatch's backward without FSDP gradient sync and reduces once at
    the end of each ``schedule.step`` (``perform_reduce_grad``, the REDUCE_GRAD action).
    With ``grad_sync = False`` that reduction is skipped: FSDP keeps accumulating
    unsharded gradients until a step with ``grad_sync = True`` reduce-scatters them all,
    once per optimizer step instead of once per accumulated batch (more memory, fewer
    collectives).
    """

    grad_sync: bool = True
    #: ``(activation slots, gradient slots)``: the receive buffers of microbatch ``i`` share
    #: memory with those of ``i mod slots`` (:func:`_pool_recv_buffers`); None: one per microbatch
    recv_pool_slots: tuple[int, int] | None = None

    def _prepare_forward_infra(self, *args, **kwargs):
        out = super()._prepare_forward_infra(*args, **kwargs)
        if self.recv_pool_slots is not None:
            _pool_recv_buffers(self.args_recv_info, self.recv_pool_slots[0])
        return out

    def _setup_backward_recv_info(self, num_microbatches: int):
        super()._setup_backward_recv_info(num_microbatches)
        if self.recv_pool_slots is not None:
            _pool_recv_buffers(self.grad_recv_info, self.recv_pool_slots[1])

    def _post_metadata_inference_cleanup(self) -> None:  # torch >= 2.12 hook
        mode = getattr(self, "_inference_mode", None)
        if mode is not None and getattr(mode, "value", None) == "static":
            return
        super()._post_metadata_inference_cleanup()

    def perform_reduce_grad(self, grad_scale_factor: int):
        """The schedule's REDUCE_GRAD action, run once at the end of each ``schedule.step``.

        With ``grad_sync`` True this is torch's ``PipelineStage.perform_reduce_grad`` (FSDP
        post-backward: reduce-scatter and reshard, then ``scale_grads``). With ``grad_sync``
        False the FSDP reduction is skipped and only the local gradients are scaled.

        Args:
            grad_scale_factor: divisor for every gradient: the microbatch count when the
                schedule scales gradients (``scale_grads``), else 1 (no division).
        """
        if self.grad_sync:
            return super().perform_reduce_grad(grad_scale_factor)
        if grad_scale_factor != 1:
            self.scale_grads(grad_scale_factor)


def set_static_stage_meta(
    stage: PipelineStage,
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
) -> None:
    """Give ``stage`` static input/output metadata for the next initialisation.

    Args:
        stage: the stage to configure.
        inputs: example (meta-device is fine) tensors of one microbatch's stage inputs.
            A floating-point input of a non-first stage must have
            ``requires_grad=True`` or the backward recv never posts and ranks deadlock.
        outputs: example tensors of one microbatch's stage outputs.
    """
    inputs = tuple(inputs)
    outputs = tuple(outputs)
    if STAGE_META_API == "new":
        from torch.distributed.pipelining._utils import _StageMeta, extract_tensor_metas

        stage._user_meta = _StageMeta(
            inputs=extract_tensor_metas(inputs),
            outputs=extract_tensor_metas(outputs),
        )
        # Forget what the last initialisation derived, so nothing stale survives.
        stage._stage_meta = _StageMeta()
    else:
        stage.inputs_meta = inputs
        stage._outputs_meta = None
        stage._configure_outputs_meta(outputs)


def stage_uses_static_meta(stage: PipelineStage) -> bool:
    """True when ``stage`` will skip shape inference at its next initialisation."""
    if STAGE_META_API == "new":
        meta = getattr(stage, "_user_meta", None)
        return meta is not None and meta.is_complete_for_forward()
    return getattr(stage, "inputs_meta", None) is not None and getattr(stage, "_outputs_meta", None) is not None


def mark_schedule_uninitialized(schedule) -> None:
    """Make the next ``schedule.step()`` re-create recv/send buffers from stage metadata."""
    names = (
        "_stage_forward_initialized",
        "_stage_backward_initialized",
        "_stages_forward_initialized",
        "_stages_backward_initialized",
        "_stage_initialized",
        "_stages_initialized",
    )
    found = False
    for name in names:
        if hasattr(schedule, name):
            setattr(schedule, name, False)
            found = True
    if not found:
        raise RuntimeError(
            f"{type(schedule).__name__} has none of the initialisation flags nemo_pp knows "
            f"({', '.join(names)}); torch {torch.__version__} changed its private API: "
            "update nemo_pp/_torch_compat.py"
        )


def schedule_action_lists(schedule_class, pp_size: int, n_microbatches: int, stages_per_rank: int) -> list[list]:
    """Per-rank compute action lists of a schedule class, built without process groups
    (torch's private ``_schedule_visualizer.get_schedule_ops``)."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    return get_schedule_ops(schedule_class, pp_size, n_microbatches, stages_per_rank, add_spacing=False)


def action_from_str(text: str):
    """Parse one schedule cell (``0F1``, ``1B0``, ``2W3``); None for an empty cell.

    Raises:
        RuntimeError / ValueError / AttributeError: torch's errors for an unreadable cell.
    """
    return Action.from_str(text)


def runtime_schedule_class(named_class=None) -> type:
    """The schedule class that runs an action list: ``named_class`` when it is a
    ``_PipelineScheduleRuntime`` subclass (e.g. ``ScheduleDualPipeV``), else the runtime itself."""
    runtime = _schedules._PipelineScheduleRuntime
    if named_class is not None and issubclass(named_class, runtime):
        return named_class
    return runtime


def load_schedule_actions(schedule, actions_by_rank: Sequence[Sequence]) -> None:
    """Install a compute-only action list (row r = pp rank r) into a runtime schedule,
    as torch's ``_load_csv`` does after reading the file, and lower it with comms.

    Raises:
        Exception: torch's errors for an inconsistent action list.
    """
    schedule.pipeline_order = {rank: list(row) for rank, row in enumerate(actions_by_rank)}
    schedule._validate_and_set_stage_mapping(schedule.pipeline_order)
    schedule._prepare_schedule_with_comms(schedule.pipeline_order)


def single_stage_schedule_shape(schedule) -> tuple[int, int]:
    """``(pp_size, n_microbatches)`` of a built GPipe / 1F1B schedule."""
    return schedule._stage.group_size, schedule._n_microbatches


def flatten_mesh(mesh, name: str):
    """Flatten a multi-axis DeviceMesh slice into one axis called ``name``; keep the
    returned object (slicing it again from the root mesh is deprecated in torch 2.13)."""
    return mesh._flatten(name)


def slice_with_flattened(root, names: tuple[str, ...]):
    """``root[names]`` where some of ``names`` are flattened axes (HSDP over
    ``(dp_replicate, dp_shard_cp)``, as torchtitan builds it). torch 2.13 warns that slicing
    a flattened axis from the root will be deprecated but offers no 2D alternative yet;
    the warning is silenced here, where a torch upgrade would be mended."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
        return root[names]


@functools.cache
def _step_takes_return_outputs(schedule_class: type) -> bool:
    return "return_outputs" in inspect.signature(schedule_class.step).parameters


def run_schedule(schedule, *args, train: bool = True, chunk_dims: dict[str, int] | None = None, **kwargs):
    """``schedule.step`` (or ``.eval``) without keeping the last stage's outputs: torch
    otherwise holds every microbatch's logits until the step ends (``return_outputs``,
    torch >= 2.12; older torch keeps them).

    ``chunk_dims``: the axis along which a tensor keyword argument is split into
    microbatches where it is not 0 (Qwen2-VL's ``position_ids: [3, B, S]`` -> 1). Set per
    call as the schedule's kwargs chunk spec (a private attribute: torch takes the spec only
    at construction, for every later step)."""
    from torch.distributed.pipelining.microbatch import TensorChunkSpec

    schedule._kwargs_chunk_spec = None if not chunk_dims else {
        k: TensorChunkSpec(chunk_dims.get(k, 0)) for k in kwargs if k not in ("target", "losses")}
    if _step_takes_return_outputs(type(schedule)):
        kwargs["return_outputs"] = False
    return (schedule.step if train else schedule.eval)(*args, **kwargs)
