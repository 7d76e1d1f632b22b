"""The finite-step guard's stop rule (the engine skips a step whose loss or gradient norm is
not finite; this decides when skipping turns into stopping)."""

from __future__ import annotations

from tqdm import tqdm

from nemo_pp.errors import NonFiniteStepError

__all__ = ["SkipCounter"]


class SkipCounter:
    """The finite-step guard's stop rule: counts skipped (non-finite) steps in a row, warns
    for each and raises :class:`NonFiniteStepError` at ``limit`` of them. Every rank sees
    the same steps skipped (the engine decides from all-reduced values)."""

    def __init__(self, limit: int, is_main: bool):
        self.limit, self.is_main = limit, is_main
        self.in_a_row = self.total = self.last_step = 0

    def update(self, step: int, out: dict) -> None:
        """Count step ``step``'s outcome (``TrainEngine.train_step``'s ``skipped`` and ``nonfinite``).

        Raises:
            NonFiniteStepError: the ``limit``-th skipped step in a row (names
                ``step_scheduler.max_consecutive_skipped_steps`` and what to change).
        """
        self.last_step = step
        if not out["skipped"]:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        where = out["nonfinite"]
        at = "; ".join(s for s in (
            f"loss on stage {', '.join(map(str, where['loss_stages']))}" if where["loss_stages"] else "",
            f"gradients of stage {', '.join(map(str, where['grad_stages']))}" if where["grad_stages"] else "",
        ) if s) or "the gradient norm"
        message = (f"step {step}: non-finite loss {out['loss']} / grad norm {out['grad_norm']} ({at}): skipped, "
                   f"weights, optimizer state and learning rate unchanged ({self.in_a_row} of {self.limit} in a row)")
        if self.is_main:
            tqdm.write(f"warning: {message}")
        if self.in_a_row >= self.limit:
            raise NonFiniteStepError(
                f"stopped after {self.in_a_row} non-finite steps in a row (step_scheduler.max_consecutive_skipped_steps"
                f"={self.limit}; last: {message}). Nothing non-finite was written: the checkpoints on disk hold the "
                "weights of the last finite step. Lower optimizer.lr (or clip_grad_norm.max_norm) and run again; it "
                "resumes from the latest checkpoint"
            )
