"""Model-agnostic pipelining building blocks (NeMo AutoModel's ``functional`` module, name for name).

The pieces live in small modules (``split``, ``schedules``, ``shapes``); this module
is their public namespace plus :func:`pipeline_model`, which composes them.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Protocol

import torch
from torch import nn

from .schedules import (  # noqa: F401  (re-exported)
    SCHEDULE_NAMES,
    V_STYLE_SCHEDULES,
    build_pipeline_schedule,
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
    split_model_into_stages,
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


def _wrap_stage_forward_to_emit_tensor(stage_model: nn.Module) -> None:
    """Make a stage's ``forward`` return a tensor where it returns a ``ModelOutput``.

    torch's pipelining sends tensors between stages and reads ``.shape`` on each output;
    a ``CausalLMOutputWithPast`` is unwrapped to ``.logits`` (logits on the last stage,
    pass-through hidden states elsewhere), a ``BaseModelOutput`` to
    ``.last_hidden_state``. Tensors and tuples pass unchanged.
    """
    original = stage_model.forward
    if getattr(original, "_nemo_pp_emits_tensor", False):
        return
    from transformers.utils import ModelOutput

    @functools.wraps(original)
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, ModelOutput):
            for key in ("logits", "last_hidden_state"):
                value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
                if value is not None:
                    return value
            raise TypeError(f"stage output {type(out).__name__} has neither logits nor last_hidden_state")
        return out

    forward._nemo_pp_emits_tensor = True
    stage_model.forward = forward


def divide_grads(modules, divisor: float) -> None:
    """Divide every ``.grad`` of ``modules`` by ``divisor`` (e.g. the step's label tokens)."""
    if divisor == 1:
        return
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(divisor)


def scale_grads_by_divisor(stages: list, divisor: float) -> None:
    """Divide every gradient of the local stages by ``divisor`` (e.g. label tokens)."""
    divide_grads([stage.submod for stage in stages], divisor)


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
    """Split, parallelize and schedule a model in one call.

    Returns:
        ``(schedule, model_parts, has_first_stage, has_last_stage, stages)``.

    Raises:
        ValueError: see :func:`split_model_into_stages` and :func:`build_pipeline_schedule`.
    """
    if device is None:
        device = torch.device("cpu")
    pp_mesh = world_mesh[pp_axis_name] if world_mesh.ndim > 1 else world_mesh
    stages, model_parts = split_model_into_stages(
        model,
        pp_mesh,
        pp_axis_name,
        pipeline_parallel_schedule or "1f1b",
        device,
        module_names_per_stage=module_fqns_per_model_part,
        layers_per_stage=layers_per_stage,
        patch_inner_model=patch_inner_model,
        patch_causal_lm_model=patch_causal_lm_model,
        round_to_pp_multiple=round_to_pp_multiple,
        pp_schedule_csv=pipeline_parallel_schedule_csv,
    )
    for part in model_parts:
        if not (patch_inner_model or patch_causal_lm_model):
            _wrap_stage_forward_to_emit_tensor(part)
        if parallelize_fn is not None:
            parallelize_fn(
                part,
                world_mesh,
                moe_mesh,
                pp_enabled=True,
                dp_axis_names=dp_axis_names,
                cp_axis_name=cp_axis_name,
                tp_axis_name=tp_axis_name,
                ep_axis_name=ep_axis_name,
                ep_shard_axis_names=ep_shard_axis_names,
            )
    schedule = build_pipeline_schedule(
        pipeline_parallel_schedule_csv,
        pipeline_parallel_schedule,
        microbatch_size,
        local_batch_size,
        stages,
        loss_fn,
        scale_grads=scale_grads,
    )
    config = getattr(model, "config", None)
    if seq_len is not None and config is not None:
        _precompute_stage_shapes(stages, config, microbatch_size, seq_len, tensor_dtype)
    has_first = any(s.is_first for s in stages)
    has_last = any(s.is_last for s in stages)
    return schedule, model_parts, has_first, has_last, stages
