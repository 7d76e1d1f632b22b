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


def format_step(record: dict) -> str:
    """``step 3/40 | loss 1.2345 | grad_norm 2.31 | lr 1.0e-04 | 812 tok/s | 2.41 s | mem 1.2 GiB``."""
    return (
        f"step {record['step']}/{record['total_steps']} | loss {record['loss']:.4f} | "
        f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s | "
        f"{record['step_time_s']:.2f} s | mem {record['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
