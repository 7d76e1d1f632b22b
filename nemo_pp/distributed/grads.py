"""Gradient arithmetic of one optimizer step on any parallel layout: division by a
common divisor (the step's label tokens) and clipping by the global norm.

Each pp rank only sees its stages' gradients, so a per-rank ``clip_grad_norm_``
would clip with the wrong norm. The global norm is ``(sum_r ||g_r||_p^p)^(1/p)``
all-reduced over the pp group (max for the inf-norm), the method of torchtitan's
``clip_grad_norm_`` for pipeline parallelism.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def divide_grads(modules: Iterable[nn.Module], divisor: float) -> None:
    """Divide every ``.grad`` of ``modules`` by ``divisor`` (e.g. the step's label tokens)."""
    if divisor == 1:
        return
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(divisor)


def align_grad_placements(params: Iterable[nn.Parameter]) -> None:
    """Give every DTensor gradient its parameter's placements.

    Tensor-parallel backward can leave a gradient in another layout than its parameter:
    a vocab-parallel embedding's comes out ``Replicate``, a sequence-parallel norm's
    ``Partial``. Redistributing once after backward (a local slice for ``Replicate ->
    Shard``, an all-reduce for ``Partial -> Replicate``) makes the tied-copy sum, clipping
    and the optimizer see one layout per parameter.
    """
    for p in params:
        g = p.grad
        if g is not None and hasattr(g, "placements") and hasattr(p, "placements") and g.placements != p.placements:
            p.grad = g.redistribute(device_mesh=p.device_mesh, placements=p.placements)


def _same_layout_groups(items: list, tensor_of=lambda t: t) -> dict:
    """``items`` by the (mesh, placements) of ``tensor_of(item)`` for DTensors, None for
    plain tensors: torch's foreach kernels refuse a mix of the two, or of DTensors on
    different meshes (TP weights next to replicated norms, FSDP2 x TP)."""
    groups: dict = {}
    for item in items:
        t = tensor_of(item)
        key = (t.device_mesh, tuple(t.placements)) if hasattr(t, "device_mesh") else None
        groups.setdefault(key, []).append(item)
    return groups


def _local_total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of ``grads`` over this pp rank's stages. DTensor grads (FSDP2, TP) are
    grouped by mesh and placements, and each group's norm is reduced over its mesh. Plain
    grads are whole on every rank that holds them (a norm weight under TP), so they are
    counted once."""
    norms = []
    for group in _same_layout_groups(grads).values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=norm_type)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norms.append(norm.float())
    if len(norms) == 1:
        return norms[0]
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    return stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def clip_grad_norm_across_stages(
    parameters: Iterable[nn.Parameter],
    max_norm: float | None,
    norm_type: float = 2.0,
    pp_group=None,
    exclude_from_norm: Iterable[nn.Parameter] = (),
) -> torch.Tensor:
    """Clip all gradients of ``parameters`` by the norm over every pipeline stage.

    Args:
        parameters: this rank's parameters (all local stages).
        max_norm: clip threshold; None or inf only computes the norm.
        norm_type: p of the p-norm; ``inf`` for the max-norm.
        pp_group: process group of the pipeline axis (None: no pipeline).
        exclude_from_norm: parameters left out of the norm but still clipped (the
            second copy of a tied embedding, so the tied weight counts once).

    Returns:
        the global gradient norm (float32 scalar tensor), equal to the unsplit
        model's ``torch.nn.utils.clip_grad_norm_`` result.
    """
    params = [p for p in parameters if p.grad is not None]
    excluded = {id(p) for p in exclude_from_norm}
    grads = [p.grad for p in params if id(p) not in excluded]
    norm_type = float(norm_type)
    if grads:
        total = _local_total_norm(grads, norm_type)
    else:
        device = params[0].grad.device if params else torch.device("cpu")
        total = torch.zeros((), device=device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
        else:
            total = total**norm_type
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
            total = total ** (1.0 / norm_type)
    clip_grads_with_norm(params, max_norm, total)
    return total


def clip_grads_with_norm(parameters: Iterable[nn.Parameter], max_norm: float | None, total_norm: torch.Tensor) -> None:
    """Scale the gradients of ``parameters`` by ``max_norm / total_norm`` where that is below 1
    (``torch.nn.utils.clip_grads_with_norm_``, per DTensor layout group).

    Args:
        parameters: this rank's parameters; those without a gradient are left alone.
        max_norm: the threshold; None or inf: nothing is scaled.
        total_norm: the global norm from :func:`clip_grad_norm_across_stages` (scalar tensor).
    """
    params = [p for p in parameters if p.grad is not None]
    if max_norm is not None and not math.isinf(max_norm) and params:
        for group in _same_layout_groups(params, lambda p: p.grad).values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
