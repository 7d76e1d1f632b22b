"""Context parallelism (CP): each cp rank holds a load-balanced slice of every sequence.

Sequence layout (the "head-tail" or zig-zag split of torch's ``context_parallel`` and of
Megatron-LM's CP): a sequence of ``S`` tokens is cut into ``2 * cp`` chunks of
``k = S / (2 * cp)`` tokens, and cp rank ``r`` holds chunk ``r`` followed by chunk
``2 * cp - 1 - r``. Under a causal mask the first chunks attend to few keys and the
last to many, so pairing a head chunk with its mirrored tail chunk gives every rank
the same attention work. ``input_ids``, ``labels`` and ``position_ids`` are split the
same way (:func:`shard_batch`); ``position_ids`` then carry each token's place in the
whole sequence, which is what rotary embeddings and the causal mask need.

Attention over the split sequence, chosen by ``distributed.cp_attention``:

* ``allgather`` (:func:`allgather_attention`, any device, gloo included): each layer
  all-gathers keys and values over the cp group and attends its own queries to all of
  them under the causal mask of the global positions. The gather's backward is a
  reduce-scatter of dK/dV, so gradients are exact. Per rank it keeps the full
  ``[B, H_kv, S, D]`` keys and values and a ``[L, S]`` score block per head
  (``L = S / cp``): scores and everything outside attention shrink by ``cp``.
  Registered as an attention function in transformers' ``AttentionInterface``, so the
  HF decoder layers run unchanged.
* ``ring`` (CUDA only): torch's ``context_parallel`` (ring attention over SDPA,
  :func:`ring_attention` calls SDPA with ``is_causal=True`` inside it). Keys and values
  travel around the ring instead of being gathered: no full-length K/V on any rank.
* ``auto``: ring on CUDA, allgather elsewhere.

Loss normalisation stays exact without any change: each cp rank sums the loss of its
own label tokens, the recipe divides by the label tokens of the whole batch, and FSDP2
sums gradients over ``dp_shard_cp`` (dp_shard x cp).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ALLGATHER_ATTENTION = "nemo_pp_cp_allgather"
RING_ATTENTION = "nemo_pp_cp_ring"

__all__ = [
    "ALLGATHER_ATTENTION",
    "RING_ATTENTION",
    "ContextParallel",
    "ContextParallelizer",
    "allgather_attention",
    "ring_attention",
    "shard_batch",
    "zigzag_positions",
]



@functools.lru_cache(maxsize=64)
def _zigzag_positions(seq_len: int, cp_size: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    k = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * k, (cp_rank + 1) * k, device=device)
    tail = torch.arange((2 * cp_size - 1 - cp_rank) * k, (2 * cp_size - cp_rank) * k, device=device)
    return torch.cat([head, tail])


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions in the whole sequence of the ``seq_len / cp_size`` tokens cp rank ``cp_rank`` holds.

    Returns:
        ``[seq_len / cp_size] int64``: chunk ``cp_rank`` then chunk ``2 * cp_size - 1 - cp_rank``
        of ``2 * cp_size`` equal chunks (torch's ``_HeadTailLoadBalancer`` order).

    Raises:
        ValueError: ``seq_len`` is not a multiple of ``2 * cp_size`` (names
            ``dataloader.pad_seq_len_divisible``, which the recipe sets to such a multiple).
    """
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"context parallelism splits every sequence into 2*cp_size = {2 * cp_size} chunks, but a batch has "
            f"{seq_len} tokens per sample; set dataloader.pad_seq_len_divisible to a multiple of {2 * cp_size}"
        )
    return _zigzag_positions(int(seq_len), int(cp_size), int(cp_rank), torch.device(device))


def shard_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This cp rank's slice of a batch: ``input_ids`` and ``labels`` ``[B, S] -> [B, S / cp]``,
    plus ``position_ids [B, S / cp] int64`` holding their positions in the whole sequence.

    Other entries (``num_tokens``, ...) are kept whole.

    Raises:
        ValueError: ``S`` is not a multiple of ``2 * cp_size``, or the batch carries its own
            ``position_ids`` (packed rows, which CP does not support).
    """
    if "position_ids" in batch:
        raise ValueError("context parallelism does not support batches with their own position_ids (packed_sequence); "
                         "set packed_sequence.packed_sequence_size: 0 or distributed.cp_size: 1")
    ids = batch["input_ids"]
    positions = zigzag_positions(ids.shape[1], cp_size, cp_rank, ids.device)
    out = dict(batch)
    out["input_ids"] = ids.index_select(1, positions)
    out["labels"] = batch["labels"].index_select(1, positions.to(batch["labels"].device))
    out["position_ids"] = positions.unsqueeze(0).expand(ids.shape[0], -1).clone()
    return out


@dataclass
class ContextParallel:
    """The cp axis of one rank: which attention runs and how batches are sliced.

    Args:
        mesh_bundle: the run's :class:`~nemo_pp.distributed.mesh.MeshBundle` (its ``cp`` axis
            and the flattened ``dp_cp`` view).
        attention: ``"allgather"`` or ``"ring"`` (resolved by
            :func:`nemo_pp.planning.checks.resolve_cp_attention`).
    """

    mesh_bundle: object
    attention: str

    # looked up once: the attention reads ``group`` in every layer's forward and backward
    @functools.cached_property
    def mesh(self):
        """The 1D ``cp`` sub-mesh."""
        return self.mesh_bundle.world["cp"]

    @functools.cached_property
    def loss_group(self):
        """dp x cp: the ranks whose loss sums add up to the global batch's (one all-reduce)."""
        return self.mesh_bundle.dp_cp.get_group()

    @functools.cached_property
    def size(self) -> int:
        """The cp degree: ranks sharing one sequence."""
        return self.mesh.size()

    @functools.cached_property
    def rank(self) -> int:
        """This rank's index on the ``cp`` axis, in ``[0, size)``."""
        return self.mesh.get_local_rank()

    @functools.cached_property
    def group(self):
        """The ``cp`` process group (the all-gather attention's collectives)."""
        return self.mesh.get_group()

    @contextlib.contextmanager
    def sharded(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Yield ``(input_ids, labels, position_ids)`` of this rank (``[B, S / cp]`` each);
        for ``ring``, inside torch's ``context_parallel``, which slices them the same way
        and routes SDPA to ring attention until the block ends."""
        if self.attention != "ring":
            local = shard_batch({"input_ids": input_ids, "labels": labels}, self.size, self.rank)
            yield local["input_ids"], local["labels"], local["position_ids"]
            return
        from torch.distributed.tensor.experimental import context_parallel

        zigzag_positions(input_ids.shape[1], self.size, self.rank)  # the divisibility check, named
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).clone()
        buffers = [input_ids.clone(), labels.clone(), positions]
        with context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
            yield tuple(buffers)


# --------------------------------------------------------------------- attention
# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.11 has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 (the sequence of ``[B, H, L, D]``) over a group, rank order;
    backward reduce-scatters the gradient (sum), so every rank gets the gradient of its own
    slice from all ranks' queries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        local = x.movedim(2, 0).contiguous()
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        _all_gather_single(out, local, group=group)
        return out.movedim(0, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        full = grad.movedim(2, 0).contiguous()
        out = full.new_empty((full.shape[0] // size, *full.shape[1:]))
        _reduce_scatter_single(out, full, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, 2), None


@functools.lru_cache(maxsize=8)  # [L, S] each: a few sequence lengths at a time
def _allowed(seq_local: int, cp_size: int, cp_rank: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[L, cp * L] bool``: query i (this rank's) may attend gathered key j."""
    q = _zigzag_positions(seq_local * cp_size, cp_size, cp_rank, device)
    k = torch.cat([_zigzag_positions(seq_local * cp_size, cp_size, r, device) for r in range(cp_size)])
    diff = q[:, None] - k[None, :]
    allowed = diff >= 0
    if window:
        allowed &= diff < window  # transformers' sliding_window_overlay: q - k < window
    return allowed


@functools.lru_cache(maxsize=8)
def _additive_mask(seq_local: int, cp_size: int, cp_rank: int, window: int | None, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """:func:`_allowed` as SDPA's additive float mask (0 / -inf), one tensor shared by every
    layer: SDPA converts a boolean mask to this and saves the copy for backward, per layer
    (measured on CPU: 4 x 32 MiB at 4096 tokens, cp 2, 4 layers)."""
    allowed = _allowed(seq_local, cp_size, cp_rank, window, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _cp_of(module: nn.Module) -> ContextParallel:
    cp = getattr(module, "_nemo_pp_cp", None)
    if cp is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the context-parallel attention but was not prepared by ContextParallelizer"
        )
    return cp


def _repeat_kv_heads(key: torch.Tensor, value: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention as plain multi-head: each of ``H_kv`` heads repeated ``groups``
    times along dim 1 (the order transformers' ``repeat_kv`` uses)."""
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def allgather_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``) for CP on any device.

    Args:
        module: the HF attention module (carries ``_nemo_pp_cp``, set by :class:`ContextParallelizer`).
        query: ``[B, H_q, L, D]`` of this rank's tokens (``L = S / cp``, zig-zag order).
        key / value: ``[B, H_kv, L, D]``, likewise; all-gathered to ``[B, H_kv, S, D]``.
        attention_mask: ignored (None: the stage builds none for this implementation); the
            causal (and ``sliding_window``) mask comes from the global positions.
        dropout: attention dropout probability; scaling: the softmax scale (None: ``D ** -0.5``);
        softcap: Gemma 2's ``cap * tanh(scores / cap)`` before the mask.

    Returns:
        ``([B, L, H_q, D], None)`` as transformers' own attention functions.

    Raises:
        NotImplementedError: attention sinks (``s_aux``), which this function does not model.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("context parallelism does not support attention sinks (s_aux)")
    cp = _cp_of(module)
    key = _GatherSequence.apply(key, cp.group)
    value = _GatherSequence.apply(value, cp.group)
    groups = query.shape[1] // key.shape[1]
    dropout = dropout if module.training else 0.0
    # grouped-query attention: the CPU kernels take kv heads as they are (enable_gqa); CUDA's
    # masked kernel (memory-efficient attention) does not, so kv heads are repeated there
    gqa = groups > 1 and query.device.type == "cpu" and softcap is None
    if not gqa:
        key, value = _repeat_kv_heads(key, value, groups)
    if softcap is None:
        mask = _additive_mask(query.shape[2], cp.size, cp.rank, sliding_window, query.device, query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, **({"enable_gqa": True} if gqa else {}))
    else:
        allowed = _allowed(query.shape[2], cp.size, cp.rank, sliding_window, query.device)
        scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0), value)
    return out.transpose(1, 2).contiguous(), None


def ring_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``cp_attention: ring``: causal SDPA, which torch's
    ``context_parallel`` (entered by :meth:`ContextParallel.sharded`) turns into ring attention.

    Shapes as :func:`allgather_attention`; kv heads are repeated here, since the ring
    dispatch takes SDPA's plain signature (no ``enable_gqa``).

    Raises:
        NotImplementedError: a sliding window, soft-capping or attention sinks (plain causal SDPA only).
    """
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise NotImplementedError("cp_attention: ring supports plain causal attention only (no sliding window, "
                                  "soft-capping or sinks); set distributed.cp_attention: allgather")
    key, value = _repeat_kv_heads(key, value, query.shape[1] // key.shape[1])
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention_functions() -> None:
    # Registered in AttentionInterface only, not in the mask interface: transformers then
    # builds no mask for these implementations (the functions derive their own).
    from transformers import AttentionInterface

    AttentionInterface.register(ALLGATHER_ATTENTION, allgather_attention)
    AttentionInterface.register(RING_ATTENTION, ring_attention)


class ContextParallelizer:
    """A parallelize_fn step: the stage's attention runs over the cp group.

    Gives the stage its own copy of the model config with ``_attn_implementation`` set to
    the CP attention (the unsplit model's config, which the HF export writes, is left as it
    was) and gives every module that reads that config the run's one :class:`ContextParallel`
    (the object the engine slices batches with), which the attention function reads from
    the module transformers hands it.

    Args:
        cp: the run's :class:`ContextParallel`.
    """

    def __init__(self, cp: ContextParallel):
        self.cp = cp

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **_):
        _register_attention_functions()
        cp = self.cp
        old = getattr(model, "config", None)
        if old is None:
            raise ValueError(f"{type(model).__name__} has no .config: context parallelism needs a Hugging Face model")
        new = copy.copy(old)
        new._attn_implementation = ALLGATHER_ATTENTION if cp.attention == "allgather" else RING_ATTENTION
        for module in model.modules():
            if getattr(module, "config", None) is old:
                module.config = new
                module._nemo_pp_cp = cp
        return model
