"""Stop cleanly when the scheduler asks: SIGTERM -> checkpoint at the next step boundary -> exit.

Cluster schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they kill a job;
torchrun forwards it to every worker and kills them 30 s later (torch.distributed.elastic,
``PContext.close``). The handler only sets a flag; at each step boundary the ranks agree
(one all-reduce of a flag: a rank that got the signal stops them all) so every rank takes
the same decision and saves the same checkpoint.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

__all__ = ["PreemptionWatcher"]


class PreemptionWatcher:
    """Notes SIGTERM (and any ``signals``) instead of dying; :meth:`requested` asks all ranks.

    Use as a context manager; the previous handlers come back on exit.

    Args:
        device: where the agreement flag lives (the default process group's device).
        signals: the signals that request a stop.
        enabled: False leaves the signals' handlers alone (nothing could be saved, so a
            stop signal must still stop the process) and :meth:`requested` is always False.
    """

    def __init__(self, device: torch.device, signals: tuple[int, ...] = (signal.SIGTERM,), enabled: bool = True):
        self.device = device
        self.signals = signals if enabled else ()
        self.enabled = enabled
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionWatcher":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank when any rank received a stop signal (collective when enabled)."""
        if not self.enabled:
            return False
        flag = torch.tensor([0 if self.received is None else 1], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
