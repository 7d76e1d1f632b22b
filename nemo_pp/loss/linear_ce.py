"""Cross entropy of the output projection without the ``[tokens, V]`` logits.

The last pipeline stage of a causal LM normally materialises fp32 logits ``[mb, S, V]``
and their gradient; for a Llama-3 vocabulary (128,256) at 4,096 tokens that is 2.1 GB per
microbatch before the gradient. :class:`FusedLinearCrossEntropy` takes the final hidden
states and the output projection's weight instead and works on chunks of tokens: each
chunk's logits are computed, reduced to a log-sum-exp and the target logit, and dropped;
backward recomputes them chunk by chunk (the approach of Wijmans et al., "Cut Your Losses
in Large-Vocabulary Language Models", 2024, and Liger-Kernel's fused linear cross
entropy, written here in plain torch). Only label tokens are computed at all: a position
whose label is ``ignore_index`` (a prompt, padding) contributes neither loss nor gradient,
so its logits are never formed.

Under tensor parallelism the projection is vocabulary-parallel (``[V / tp, H]`` per rank)
and the loss is computed on the shards without gathering logits, as
``torch.distributed.tensor.parallel.loss_parallel`` and Megatron-LM's
``vocab_parallel_cross_entropy`` do: a MAX and a SUM all-reduce of ``[chunk]`` per chunk,
and one SUM all-reduce of the hidden states' gradient.

:class:`ChunkedCrossEntropy` is the smaller step, for any loss input: it still takes the
logits but upcasts and softmaxes them one chunk at a time, so the fp32 copy and its
softmax exist for one chunk only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_pp.loss.masked_ce import _REDUCTIONS, IGNORE_INDEX

__all__ = ["ChunkedCrossEntropy", "FusedLinearCrossEntropy", "linear_cross_entropy"]

#: tokens per chunk of :class:`FusedLinearCrossEntropy`: a ``[chunk, V]`` fp32 block is
#: 200 MB at SmolLM2's 49,152 and 525 MB at Llama-3's 128,256 vocabulary entries; larger
#: chunks gain little GEMM efficiency (measured in scripts/bench_limit.py)
DEFAULT_CHUNK_SIZE = 1024


def _check_arguments(reduction: str, **chunks: int) -> None:
    """Raise ``ValueError`` naming ``loss_fn.<key>`` for an unknown reduction or a chunk below 1."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"loss_fn.reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    for key, value in chunks.items():
        if value < 1:
            raise ValueError(f"loss_fn.{key} must be at least 1, got {value}")


def _transformed(z: torch.Tensor, transform: Callable | None) -> torch.Tensor:
    return z if transform is None else transform(z)


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Summed cross entropy of ``transform(hidden @ weight.T)`` against ``labels``, chunk
    by chunk; saves the inputs and a ``[N]`` fp32 log-sum-exp, never ``[N, V]``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, transform, group, vocab_start):
        n, v_local = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _transformed(hidden[s:e] @ weight.t(), transform).float()
            local = labels[s:e] - vocab_start
            inside = (local >= 0) & (local < v_local)
            picked = z.gather(1, local.clamp(0, v_local - 1).unsqueeze(1)).squeeze(1)
            target[s:e] = torch.where(inside, picked, torch.zeros_like(picked))
            if group is None:
                lse[s:e] = torch.logsumexp(z, dim=1)
            else:
                top = z.max(dim=1).values
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                sums = torch.stack([torch.exp(z - top.unsqueeze(1)).sum(dim=1), target[s:e]])
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
                lse[s:e] = top + torch.log(sums[0])
                target[s:e] = sums[1]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.transform, ctx.group, ctx.vocab_start = chunk_size, transform, group, vocab_start
        return (lse - target).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        transform, group = ctx.transform, ctx.group
        n, v_local = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None  # [V_local, H]: the first chunk's product itself, so one chunk costs no extra buffer
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            raw = h @ weight.t()
            if transform is not None:
                raw = raw.detach().requires_grad_()
                with torch.enable_grad():
                    z = transform(raw)
            else:
                z = raw
            # d(lse - z_target)/dz = softmax(z) - onehot(target), times the incoming scalar
            dz = torch.exp(z.detach().float() - lse[s:e].unsqueeze(1))
            local = labels[s:e] - ctx.vocab_start
            inside = ((local >= 0) & (local < v_local)).nonzero().squeeze(1)
            dz[inside, local[inside]] -= 1.0
            dz.mul_(grad_loss)
            if transform is not None:
                dz = torch.autograd.grad(z, raw, dz.to(z.dtype))[0]
            dz = dz.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[s:e] = dz @ weight
            if ctx.needs_input_grad[1]:
                part = dz.t() @ h
                if grad_weight is None:
                    # fp32 accumulation over several chunks: a bf16 running sum would round at each one
                    grad_weight = part.float() if e < n else part
                else:
                    grad_weight += part
        if grad_hidden is not None and group is not None:
            # every tp rank used the same hidden states against its own vocabulary shard
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        if ctx.needs_input_grad[1] and grad_weight is None:  # no label token
            grad_weight = torch.zeros_like(weight)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None, None, None, None, None)


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logits_transform: Callable | None = None,
    tp_group=None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Summed cross entropy of ``logits_transform(hidden_states @ weight.T)`` (fp32
    log-softmax) over the tokens whose label is not ``ignore_index``.

    Args:
        hidden_states: ``[..., H]`` float, the final (normed) hidden states.
        weight: ``[V_local, H]``, the output projection (a vocabulary shard under tp).
        labels: ``[...]`` int64, aligned with ``hidden_states``: global vocabulary ids.
        ignore_index: label of a position without loss.
        chunk_size: tokens whose logits exist at once (``[chunk_size, V_local]`` fp32).
        logits_transform: elementwise map of the raw logits (logit scaling, soft-capping);
            differentiated by autograd on each chunk in backward.
        tp_group: the tensor-parallel group when ``weight`` is a vocabulary shard.
        vocab_start: the first vocabulary id of this rank's shard.

    Returns:
        fp32 scalar, connected to ``hidden_states`` and ``weight`` (0 with a zero gradient
        when no token carries a label).

    Raises:
        ValueError: ``hidden_states`` and ``labels`` disagree in shape, or ``chunk_size < 1``.
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} disagree: "
                         "expected hidden_states [..., H] with labels [...]")
    if chunk_size < 1:
        raise ValueError(f"loss_fn.chunk_size must be at least 1, got {chunk_size}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat = labels.reshape(-1)
    if not flat.is_meta:  # the memory plan runs on meta, where a data-dependent selection cannot
        keep = (flat != ignore_index).nonzero().squeeze(1)
        hidden, flat = hidden.index_select(0, keep), flat.index_select(0, keep)
    return _LinearCrossEntropyFn.apply(hidden, weight, flat, chunk_size, logits_transform, tp_group, vocab_start)


class FusedLinearCrossEntropy:
    """Cross entropy from the last stage's hidden states and the output projection, never
    forming the logits (see the module docstring); NeMo AutoModel's name and keys.

    Give it as the recipe's ``loss_fn``; the last pipeline stage then returns the loss of
    each microbatch instead of its logits and calls this with the projection's weight
    (the tied embedding's where tied; ``W + scale * B @ A`` where LoRA adapts the head),
    its family's logit scaling and soft-capping (``scale_logits``), and under tp its
    vocabulary shard. On CUDA, ``impl: cce`` uses the ``cut-cross-entropy`` package
    (Wijmans et al. 2024) where it is installed; elsewhere, and for what it cannot do
    (a vocabulary shard, a logit transform other than one scale and a soft-cap), the
    pure-torch chunked path runs.

    Args:
        ignore_index: label value that marks a position to skip.
        logit_softcapping: soft-cap ``cap * tanh(z / cap)``; 0 (default) takes the model
            config's ``final_logit_softcapping`` (Gemma 2/3), as the stage passes it.
        reduction: ``"sum"`` (the recipe's: it divides by the step's label tokens) or ``"mean"``.
        chunk_size: tokens whose logits exist at once.
        impl: ``"torch"``, ``"cce"`` (CUDA and ``cut_cross_entropy`` required) or ``"auto"``
            (``cce`` where it can run, else ``torch``).

    Raises:
        ValueError: an unknown ``reduction`` or ``impl``; ``impl: cce`` without CUDA or the package.
    """

    #: the last stage hands this loss its hidden states and projection, not logits
    takes_hidden_states = True

    def __init__(self, ignore_index: int = IGNORE_INDEX, logit_softcapping: float = 0, reduction: str = "sum",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, impl: str = "auto"):
        _check_arguments(reduction, chunk_size=chunk_size)
        if impl not in ("auto", "torch", "cce"):
            raise ValueError(f"loss_fn.impl must be 'auto', 'torch' or 'cce', got {impl!r}")
        self.ignore_index = ignore_index
        self.logit_softcapping = logit_softcapping
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.impl = impl
        if impl == "cce" and not _cce_available(torch.device("cuda")):
            raise ValueError("loss_fn.impl: cce needs a CUDA device and the cut-cross-entropy package "
                             "(pip install cut-cross-entropy); use impl: torch")

    def __call__(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        lm_weight: torch.Tensor,
        num_label_tokens: int | torch.Tensor | None = None,
        *,
        logits_transform: Callable | None = None,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        tp_group=None,
        vocab_start: int = 0,
    ) -> torch.Tensor:
        """The loss of one microbatch.

        Args:
            hidden_states: ``[B, S, H]`` or ``[N, H]`` float.
            labels: ``[B, S]`` / ``[N]`` int64, aligned (no shift here).
            lm_weight: ``[V, H]`` (``[V / tp, H]`` with ``tp_group``).
            num_label_tokens: if given, the result is ``sum / num_label_tokens``.
            logits_transform: the family's map of raw logits, applied on the torch path.
            logit_scale / softcap: the same map as numbers (``softcap`` None: the
                constructor's), for the ``cce`` kernel, which knows only these two.
            tp_group / vocab_start: the vocabulary shard's group and first id.

        Returns:
            fp32 scalar.
        """
        cap = softcap if softcap is not None else (self.logit_softcapping or None)
        if logits_transform is None and (cap or logit_scale != 1.0):
            logits_transform = _scale_and_cap(logit_scale, cap)
        if self._use_cce(hidden_states, tp_group, logits_transform, logit_scale, cap):
            total = _cce_loss(hidden_states, lm_weight, labels, self.ignore_index, logit_scale, cap)
        else:
            total = linear_cross_entropy(hidden_states, lm_weight, labels, ignore_index=self.ignore_index,
                                         chunk_size=self.chunk_size, logits_transform=logits_transform,
                                         tp_group=tp_group, vocab_start=vocab_start)
        if num_label_tokens is not None:
            return total / num_label_tokens
        if self.reduction == "sum":
            return total
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def _use_cce(self, hidden, tp_group, transform, logit_scale, cap) -> bool:
        if self.impl == "torch" or tp_group is not None or hidden.device.type != "cuda":
            return False
        # a transform given as a function (not as scale + cap) is one the kernel cannot apply
        if transform is not None and not getattr(transform, "_nemo_pp_scale_and_cap", False):
            return False
        return _cce_available(hidden.device)


def _scale_and_cap(scale: float, cap: float | None) -> Callable:
    def transform(z: torch.Tensor) -> torch.Tensor:
        if scale != 1.0:
            z = z * scale
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    transform._nemo_pp_scale_and_cap = True
    return transform


def _cce_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def _cce_loss(hidden, weight, labels, ignore_index, scale, cap):  # pragma: no cover - CUDA only
    from cut_cross_entropy import linear_cross_entropy as cce

    # z * scale == (h * scale) @ W.T: the kernel has a soft-cap but no scale
    h = hidden * scale if scale != 1.0 else hidden
    return cce(h, weight, targets=labels, ignore_index=ignore_index, softcap=cap, reduction="sum", shift=False,
               filter_eps=None).float()


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Summed fp32 cross entropy of ``[N, V]`` logits in their own dtype, upcast and
    softmaxed one chunk at a time; saves the logits and a ``[N]`` log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk_len):
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk_len):
            z = logits[s:s + chunk_len].float()
            lse[s:s + chunk_len] = torch.logsumexp(z, dim=1)
            total += F.cross_entropy(z, labels[s:s + chunk_len], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.chunk_len = ignore_index, chunk_len
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk_len):
            e = min(s + ctx.chunk_len, logits.shape[0])
            dz = torch.exp(logits[s:e].float() - lse[s:e].unsqueeze(1))
            lab = labels[s:e]
            keep = (lab != ctx.ignore_index)
            rows = keep.nonzero().squeeze(1)
            dz[rows, lab[rows]] -= 1.0
            dz *= keep.unsqueeze(1)
            out[s:e] = (dz * grad).to(logits.dtype)
        return out, None, None, None


class ChunkedCrossEntropy:
    """Cross entropy over logits, upcast to fp32 one ``chunk_len`` slice of tokens at a
    time: the full fp32 copy of ``[N, V]`` logits and its softmax never exist (the logits
    themselves still do; :class:`FusedLinearCrossEntropy` avoids them too). NeMo
    AutoModel's name and keys; the same call as :class:`~nemo_pp.loss.MaskedCrossEntropy`.

    Args:
        chunk_len: tokens per chunk.
        ignore_index: label value that marks a position to skip.
        reduction: ``"sum"`` or ``"mean"``.

    Raises:
        ValueError: an unknown ``reduction`` or ``chunk_len < 1``.
    """

    def __init__(self, chunk_len: int = 32, ignore_index: int = IGNORE_INDEX, reduction: str = "sum"):
        _check_arguments(reduction, chunk_len=chunk_len)
        self.chunk_len = chunk_len
        self.ignore_index = ignore_index
        self.reduction = reduction

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                 num_label_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """Args and result as :meth:`MaskedCrossEntropy.__call__` (logits ``[B, S, V]`` or
        ``[N, V]``, labels ``[B, S]`` / ``[N]`` int64).

        Raises:
            ValueError: shapes of logits, labels and mask do not agree.
        """
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                             "expected logits [..., V] with labels [...]")
        if mask is not None:
            if mask.shape != labels.shape:
                raise ValueError(f"mask {tuple(mask.shape)} must have labels' shape {tuple(labels.shape)}")
            labels = labels.masked_fill(mask == 0, self.ignore_index)
        flat_labels = labels.reshape(-1)
        total = _ChunkedSoftmaxCE.apply(logits.reshape(-1, logits.shape[-1]), flat_labels, self.ignore_index,
                                        self.chunk_len)
        if num_label_tokens is not None:
            return total / num_label_tokens
        if self.reduction == "sum":
            return total
        return total / (flat_labels != self.ignore_index).sum().clamp(min=1)
