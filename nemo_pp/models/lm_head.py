"""The output projection (``lm_head``) of the last stage: what a family's wrapper does to
its logits (:func:`scale_logits`), and the last stage's loss from hidden states: what a loss that never forms the logits
(``loss_fn.takes_hidden_states``, e.g. ``nemo_pp.loss.FusedLinearCrossEntropy``) needs
from the stage module, and the checks that refuse what it cannot do exactly.

The loss runs INSIDE the last stage's forward (``labels`` reach it as a schedule keyword
argument), not in the schedule's ``loss_fn``: only there are FSDP2's parameters unsharded
and its backward hooks armed, and tensor parallelism's vocabulary shard in place, exactly
as for ``lm_head``'s own forward. The schedule's ``loss_fn`` then passes the stage's
output on (:func:`stage_computed_loss`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from nemo_pp.models.module_tree import text_config

__all__ = ["HEAD_LOSS_ATTR", "check_head_loss", "head_loss", "install_head_loss", "scale_logits",
           "stage_computed_loss", "takes_hidden_states"]

#: the attribute of a last-stage module that holds its hidden-states loss
HEAD_LOSS_ATTR = "_nemo_pp_head_loss"


def scale_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """What causal-LM wrappers do to ``lm_head``'s output, read from config fields (the
    patched forward replaces the wrapper's): divide by ``logits_scaling`` (Granite),
    multiply by ``logit_scale`` (Cohere), soft-cap by ``final_logit_softcapping`` as
    ``cap * tanh(logits / cap)`` (Gemma 2 and 3)."""
    cfg = text_config(config)
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        logits = logits / scaling
    scale = getattr(cfg, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def takes_hidden_states(loss_fn) -> bool:
    """Whether ``loss_fn`` is called with hidden states and the projection (not logits)."""
    return bool(getattr(loss_fn, "takes_hidden_states", False))


def stage_computed_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's ``loss_fn`` when the last stage returned its loss: ``output [1]`` fp32."""
    return output.sum()


def check_head_loss(model: nn.Module, tp: int = 1, lora_on_head: bool = False, lora_dropout: float = 0.0,
                    patch_causal_lm_model: bool = True) -> None:
    """Refuse, before any weight is read, a model a hidden-states loss cannot run exactly.

    Args:
        model: the whole model (meta device is fine).
        tp: the tensor-parallel size.
        lora_on_head: whether LoRA adapts the output projection; ``lora_dropout`` its dropout.
        patch_causal_lm_model: the stage spec's flag; the loss needs the patched wrapper.

    Raises:
        ValueError: naming ``loss_fn`` (and the key to change): no output projection; an
            output projection with a bias; the wrapper's own forward kept; LoRA on the head
            with dropout (not a linear map of one weight) or under tp.
    """
    name = "loss_fn (FusedLinearCrossEntropy)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{name} needs the last stage to hold the output projection (lm_head); "
                         f"{type(model).__name__} has none: use nemo_pp.loss.MaskedCrossEntropy")
    if not patch_causal_lm_model:
        raise ValueError(f"{name} runs in nemo_pp's last-stage forward: set "
                         "distributed.pipeline.patch_causal_lm_model: true or use MaskedCrossEntropy")
    if getattr(_base(head), "bias", None) is not None:
        raise ValueError(f"{name}: the output projection of {type(model).__name__} has a bias, which the fused "
                         "loss does not add; use nemo_pp.loss.MaskedCrossEntropy")
    if lora_on_head:
        if lora_dropout:
            raise ValueError(f"{name} with LoRA on the output projection needs peft.dropout: 0 (dropout on the "
                             "adapter's input is not one weight); or exclude lm_head with peft.exclude_modules")
        if tp > 1:
            raise ValueError(f"{name} with LoRA on the output projection is not supported at "
                             "distributed.tp_size > 1; exclude lm_head from peft or use MaskedCrossEntropy")


def install_head_loss(stage: nn.Module, loss_fn) -> None:
    """Make the last stage ``stage`` return ``loss_fn``'s loss ``[1]`` fp32 when its forward
    receives ``labels`` (stages without ``lm_head`` are left alone)."""
    if getattr(stage, "lm_head", None) is not None:
        object.__setattr__(stage, HEAD_LOSS_ATTR, loss_fn)


def head_loss(stage: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The installed loss of ``hidden: [mb, S, H]`` (or ``[mb, S / tp, H]`` sequence shards)
    against ``labels: [mb, S] int64``, as ``[1]`` fp32 (a summed loss).

    The weight is ``lm_head``'s (``W + scale * B @ A`` under LoRA, as peft's forward
    computes it); under tp its local vocabulary shard ``[ceil(V / tp), H]`` with that
    shard's group and first id; logits transformed as the family's wrapper does
    (:func:`scale_logits`).
    """
    loss_fn = getattr(stage, HEAD_LOSS_ATTR)
    weight, group, start = _vocab_shard(_head_weight(stage.lm_head))
    hidden = _whole_sequence(hidden, labels, stage.lm_head)
    scale, cap = _scale_and_cap(stage.config)
    transform = None
    if scale != 1.0 or cap:
        transform = functools.partial(scale_logits, config=stage.config)
        transform._nemo_pp_scale_and_cap = True  # the kernel path may apply it as (scale, cap)
    loss = loss_fn(hidden, labels, weight, logits_transform=transform, logit_scale=scale, softcap=cap,
                   tp_group=group, vocab_start=start)
    return loss.float().reshape(1)


def _scale_and_cap(config) -> tuple[float, float | None]:
    cfg = text_config(config)
    scale = 1.0
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
        scale /= cfg.logits_scaling
    if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        scale *= cfg.logit_scale
    return scale, (getattr(cfg, "final_logit_softcapping", None) or None)


def _base(head: nn.Module) -> nn.Module:
    return getattr(head, "base_layer", head)


def _head_weight(head: nn.Module) -> torch.Tensor:
    """``lm_head``'s effective weight ``[V, H]``: a peft LoRA layer's base weight plus each
    active adapter's ``scaling * B @ A`` (peft's ``lora.Linear.forward`` without dropout,
    which :func:`check_head_loss` requires)."""
    base = _base(head)
    weight = base.weight
    if base is head or getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return weight
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        a, b = head.lora_A[name].weight, head.lora_B[name].weight
        weight = weight + head.scaling[name] * (b @ a).to(weight.dtype)
    return weight


def _vocab_shard(weight: torch.Tensor) -> tuple[torch.Tensor, object, int]:
    """``(local weight, tp group or None, first vocabulary id)``: a DTensor sharded on dim 0
    over a 1-D mesh is a vocabulary shard (tensor parallelism's column-wise head; torch.chunk
    sizes: ``ceil(V / tp)`` rows on all but the last ranks)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, None, 0
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"loss_fn: the output projection is a DTensor {tuple(weight.placements)} over "
                         f"{mesh.ndim} mesh dims; the fused loss takes a vocabulary shard [Shard(0)] over tp")
    rows = -(-weight.shape[0] // mesh.size())
    return weight.to_local(), mesh.get_group(), mesh.get_local_rank() * rows


def _whole_sequence(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """All sequence positions of the final hidden states as a local tensor: under sequence
    parallelism the final norm hands over a ``Shard(1)`` DTensor (or its local
    ``[mb, S / tp, H]`` slice), gathered here; the gradient returns as this rank's slice (the
    loss already sums it over tp ranks)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(hidden, DTensor):
        return hidden.full_tensor()
    if hidden.shape[1] == labels.shape[1]:
        return hidden
    return DTensor.from_local(hidden, _base(head).weight.device_mesh, [Shard(1)]).full_tensor()
