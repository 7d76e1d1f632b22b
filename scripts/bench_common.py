"""What the benchmarks share: one timed run of the real recipe under torchrun."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_135m_squad_pp2.yaml"


def timed_recipe_run(nproc: int, steps: int, *overrides: str, config: str = CONFIG, threads: int | None = None) -> dict:
    """Run ``recipes/finetune.py`` on ``nproc`` processes for ``steps`` optimizer steps
    without validation, checkpoints or export.

    Returns:
        ``{"step_s": median seconds per optimizer step, "tokens_per_s": median (padding
        included), "nonpad_tokens_per_s": median without padding, "loss": last,
        "model_tflops": median model TFLOP/s of all ranks, "mfu": the recipe's median,
        "first_step_s": the first step (compilation, buffers), "peak_memory_bytes_by_rank"}``
        over steps 2.. (the first builds the receive buffers).

    Raises:
        RuntimeError: the run failed (the end of its stderr is the message).
    """
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "recipes/finetune.py",
               "--config", config, "--step_scheduler.max_steps", str(steps), "--validation_dataset", "null",
               "--evaluation", "null", "--checkpoint.save_consolidated", "false", "--checkpoint.enabled", "false",
               f"--checkpoint.checkpoint_dir={out}", *overrides]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            errors = [line for line in lines if line.startswith("[rank")] or [  # the recipe's own message
                line for line in lines if "Error" in line and not line.startswith(" ")]
            raise RuntimeError((errors or lines or [f"exit {proc.returncode}"])[-1])
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        every = [r for r in records if r.get("event") == "train"]
        train = every[1:]
        summary = next((r for r in records if r.get("event") == "summary"), {})
        return {
            "first_step_s": every[0]["step_time_s"],
            "model_tflops": statistics.median(r["tflops"] for r in train),
            "mfu": statistics.median(r["mfu"] for r in train) if train[0].get("mfu") is not None else None,
            "peak_memory_bytes_by_rank": summary.get("peak_memory_bytes_by_rank"),
            "step_s": statistics.median(r["step_time_s"] for r in train),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "nonpad_tokens_per_s": statistics.median(r["nonpad_tokens_per_s"] for r in train),
            "loss": train[-1]["loss"],
        }
