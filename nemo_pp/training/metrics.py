"""Per-step metrics: a JSONL file and a compact log line on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class JSONLLogger:
    """Appends one JSON object per record to ``path`` (only where ``enabled``); the file
    starts empty unless ``append`` (a resumed run continues its log)."""

    def __init__(self, path: str | Path, enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = Path(path)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")

    def log(self, record: dict) -> None:
        """Append ``record`` as one JSON line, led by ``time`` (Unix seconds, to the ms; a record's
        own ``time`` wins); a no-op unless ``enabled``."""
        if self.enabled:
            record = {"time": round(time.time(), 3), **record}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def expert_load_record(step: int, moe_layers: list[int], tokens: torch.Tensor) -> dict:
    """The ``expert_load`` metrics record of a mixture of experts.

    Args:
        step: the optimizer step it is logged at.
        moe_layers: the original indices of the MoE layers (``RouterLoss.moe_layers``).
        tokens: ``[len(moe_layers), E]`` top-k assignments per expert (float64 counts).

    Returns:
        ``{"event": "expert_load", "step", "layers": [{"layer", "tokens": [E ints], "imbalance"}],
        "max_imbalance", "mean_imbalance"}``; a layer's imbalance is its busiest expert's
        tokens over the mean per expert (1.0 is perfect balance, ``E`` all on one expert).
    """
    mean = tokens.mean(dim=1).clamp(min=1e-12)
    imbalance = (tokens.max(dim=1).values / mean).tolist()
    layers = [{"layer": int(layer), "tokens": [int(t) for t in row], "imbalance": round(float(imb), 4)}
              for layer, row, imb in zip(moe_layers, tokens.tolist(), imbalance)]
    return {"event": "expert_load", "step": step, "layers": layers,
            "max_imbalance": round(max(imbalance), 4), "mean_imbalance": round(sum(imbalance) / len(imbalance), 4)}


class ExpertLoadLog:
    """Sums a mixture of experts' tokens per expert over steps and gives an
    :func:`expert_load_record` every ``every`` steps.

    Args:
        moe_layers: the original indices of the MoE layers.
        every: steps per record (``logging.expert_load_every_steps``).
    """

    def __init__(self, moe_layers: list[int], every: int):
        self.moe_layers, self.every = list(moe_layers), every
        self._tokens: torch.Tensor | None = None

    def add(self, step: int, tokens: torch.Tensor, last: bool = False) -> dict | None:
        """Add one step's ``[MoE layers, E]`` counts; the record when ``step`` is a multiple of
        ``every`` or ``last`` (then the sums start again), else None."""
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        if step % self.every and not last:
            return None
        record, self._tokens = expert_load_record(step, self.moe_layers, self._tokens), None
        return record

    def describe(self, record: dict) -> str:
        """The console line of a record."""
        return (f"expert load (busiest expert's tokens / mean, over the last {self.every} steps): worst layer "
                f"{record['max_imbalance']:.2f}, mean over layers {record['mean_imbalance']:.2f}")


def format_step(record: dict) -> str:
    """``step 3/40 | loss 1.2345 | grad_norm 2.31 | lr 1.0e-04 | 812 tok/s | 2.41 s | 40.1 GFLOP/s/rank |
    MFU 48.9% | mem 1.2 GiB``
    (``| aux 2.0123`` after the loss when the record has the router's ``aux_loss``)."""
    aux = f" | aux {record['aux_loss']:.4f}" if record.get("aux_loss") is not None else ""
    return (
        f"step {record['step']}/{record['total_steps']} | loss {record['loss']:.4f}{aux} | "
        f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s | "
        f"{record['step_time_s']:.2f} s{_flops(record)} | mem {record['peak_memory_bytes'] / 2**30:.2f} GiB"
    )


def _flops(record: dict) -> str:
    if record.get("tflops_per_rank") is None:
        return ""
    mfu = f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
    return f" | {1000 * record['tflops_per_rank']:.1f} GFLOP/s/rank{mfu}"
