"""Stop cleanly when the scheduler asks: SIGTERM -> checkpoint at the next step boundary -> exit.

Cluster schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they kill a job;
torchrun forwards it to every worker and kills them 30 s later (torch.distributed.elastic,
``PContext.close``). The handler only sets a flag; at each step boundary the ranks agree
(one all-reduce of a flag: a rank that got the signal stops them all) so every rank takes
the same decision and saves the same checkpoint.

A preempted run leaves ``<checkpoint_dir>/preempted.json`` (:func:`write_preempted_marker`)
and a finished one removes it: a batch script (``nemo-pp finetune --slurm``) cannot tell a
preemption from a crash by torchrun's exit status (1 for both), so it requeues the job
only when this marker is there.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_pp.config import write_text_atomic

__all__ = ["PREEMPTED_MARKER", "PreemptionWatcher", "clear_preempted_marker", "write_preempted_marker"]

PREEMPTED_MARKER = "preempted.json"  # in checkpoint_dir; the sbatch script (nemo_pp/launch) checks for this name


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


def write_preempted_marker(checkpoint_dir: str | Path, step: int) -> Path:
    """Record that the run stopped on a signal after saving the checkpoint of ``step``:
    ``<checkpoint_dir>/preempted.json`` (``{"step": step}``), written atomically. Call it
    on the main rank only, after that checkpoint is saved.

    Returns:
        The marker's path.

    Raises:
        OSError: the marker cannot be written.
    """
    return write_text_atomic(Path(checkpoint_dir) / PREEMPTED_MARKER, json.dumps({"step": step}) + "\n")


def clear_preempted_marker(checkpoint_dir: str | Path) -> None:
    """Remove ``<checkpoint_dir>/preempted.json`` if there is one (a run that finished was
    not preempted, whatever an earlier run of this folder left)."""
    (Path(checkpoint_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
