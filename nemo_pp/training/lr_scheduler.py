"""Linear warmup then cosine (or constant / linear) decay, as a ``LambdaLR``."""

from __future__ import annotations

import math

import torch


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    lr_warmup_steps: int = 0,
    lr_decay_style: str = "cosine",
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Scheduler stepped once per optimizer step.

    The learning rate rises linearly from ``lr/warmup`` to ``lr`` over ``lr_warmup_steps``
    optimizer steps, then decays to ``min_lr`` at ``total_steps``: half a cosine
    (Loshchilov & Hutter, SGDR, 2017), a straight line, or not at all (``constant``).

    Raises:
        ValueError: unknown ``lr_decay_style``.
    """
    styles = ("cosine", "linear", "constant")
    if lr_decay_style not in styles:
        raise ValueError(f"lr_scheduler.lr_decay_style must be one of {styles}, got '{lr_decay_style}'")
    base = optimizer.param_groups[0]["lr"]
    floor = min(1.0, min_lr / base) if base > 0 else 0.0
    warmup = max(0, int(lr_warmup_steps))
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if lr_decay_style == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if lr_decay_style == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
