"""No checkpoint or export of non-finite weights: the check every rank runs before a write.

The finite-step guard (:mod:`nemo_pp.training.engine`) keeps NaN and inf gradients out of
the weights, but an optimizer can still make them non-finite from finite gradients (a
learning rate far too high overflowing a weight). A save of such weights would rotate the
last good checkpoint away (``checkpoint.max_recent_checkpoints``), so every save and export
checks first and refuses, leaving what is on disk as it was.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nemo_pp.errors import first_error_of_all_ranks

__all__ = ["NonFiniteWeightsError", "check_finite_weights", "nonfinite_parameters"]


class NonFiniteWeightsError(RuntimeError):
    """The weights hold NaN or inf; nothing was written. The message names parameters."""


def nonfinite_parameters(parts: Sequence[nn.Module]) -> list[str]:
    """FQNs of this rank's parameters (its local shards under FSDP2/TP) holding NaN or inf."""
    bad = []
    for part in parts:
        for name, p in part.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel() and not bool(torch.isfinite(local.detach()).all()):
                bad.append(name)
    return bad


def check_finite_weights(parts: Sequence[nn.Module], what: str, rank: int = 0) -> None:
    """Raise on every rank when any rank's weights are not finite (collective: one
    ``all_gather_object`` over the default group).

    Args:
        parts: this rank's model parts.
        what: the write refused, for the message (``"checkpoint .../epoch_0_step_4"``).
        rank: this rank, for the message.

    Raises:
        NonFiniteWeightsError: naming the first parameters and the rank that holds them.
    """
    bad = nonfinite_parameters(parts)
    error = first_error_of_all_ranks(
        f"not writing the {what}: the weights hold NaN or inf (rank {rank}: {', '.join(bad[:3])}"
        f"{', ...' if len(bad) > 3 else ''}), so the checkpoints already on disk are kept as they are. "
        "The optimizer diverged: resume from the last checkpoint with a lower optimizer.lr "
        "(or a tighter clip_grad_norm.max_norm)" if bad else None
    )
    if error is not None:
        raise NonFiniteWeightsError(error)
