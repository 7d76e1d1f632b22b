"""Token-level cross entropy with ignored positions, for already-aligned labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the label of a position that carries no loss (padding, prompt tokens): PyTorch's
#: ``cross_entropy`` default and Hugging Face's convention
IGNORE_INDEX = -100

_REDUCTIONS = ("sum", "mean")


class MaskedCrossEntropy:
    """Cross entropy over tokens whose label is not ``ignore_index``.

    Labels are ALIGNED with the logits: ``labels[..., t]`` is the target for
    ``logits[..., t, :]`` (the datasets already shifted them), so nothing is shifted here.

    Under pipeline parallelism the loss of each microbatch is summed and the gradients
    are divided by the number of label tokens of the whole step afterwards, which is
    why ``reduction="sum"`` is the default.

    Args:
        fp32_upcast: compute in float32 (bf16/fp16 log-softmax over a 49k vocabulary
            loses too much precision).
        ignore_index: label value that marks a position to skip.
        reduction: ``"sum"`` or ``"mean"`` (mean over the non-ignored tokens).

    Raises:
        ValueError: ``reduction`` is not one of ``"sum"``, ``"mean"``.
    """

    def __init__(self, fp32_upcast: bool = True, ignore_index: int = IGNORE_INDEX, reduction: str = "sum"):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.fp32_upcast = fp32_upcast
        self.ignore_index = ignore_index
        self.reduction = reduction

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
        num_label_tokens: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: float ``[B, S, V]`` or ``[N, V]``.
            labels: int64 ``[B, S]`` or ``[N]``; ``ignore_index`` marks skipped tokens.
            mask: optional ``[B, S]`` / ``[N]`` bool or int; positions where it is 0 are
                skipped as well.
            num_label_tokens: if given, the result is ``sum / num_label_tokens`` whatever
                the reduction (used to normalise by the tokens of a whole step).

        Returns:
            Scalar tensor (float32 when ``fp32_upcast``). With no label token, ``"mean"``
            returns 0 connected to the graph (zero gradient), not NaN.

        Raises:
            ValueError: shapes of logits, labels and mask do not agree.
        """
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                "expected logits [..., V] with labels [...]"
            )
        if mask is not None:
            if mask.shape != labels.shape:
                raise ValueError(f"mask {tuple(mask.shape)} must have labels' shape {tuple(labels.shape)}")
            labels = labels.masked_fill(mask == 0, self.ignore_index)
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        if self.fp32_upcast:
            logits = logits.float()
        total = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        if num_label_tokens is not None:
            return total / num_label_tokens
        if self.reduction == "sum":
            return total
        # clamp keeps 0/0 from becoming NaN; total is then an exact 0 with a 0 grad.
        count = (labels != self.ignore_index).sum().clamp(min=1)
        return total / count
