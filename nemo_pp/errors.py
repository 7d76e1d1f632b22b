"""Errors every rank raises alike (docs/architecture.md, "Errors").

A check that fails on some ranks only (a data set rank 0 could not read, a checkpoint
file one rank could not open) must raise the same message on every rank: otherwise the
ranks that passed wait in their next collective until the timeout.
"""

from __future__ import annotations

import torch.distributed as dist


def first_error_of_all_ranks(error: str | None) -> str | None:
    """The first non-None ``error`` over all ranks, on every rank (collective over the
    default group; ``error`` itself without one). Lets a check that fails on some ranks
    only raise the same message everywhere instead of leaving the others in a collective."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e is not None), None)
    return error




class NonFiniteStepError(RuntimeError):
    """Training stopped: ``step_scheduler.max_consecutive_skipped_steps`` steps in a row had
    a NaN or inf loss or gradient norm (the finite-step guard of the training engine)."""
