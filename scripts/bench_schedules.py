"""Per-step time of every pipeline schedule on the main job's config (a benchmark, not a test).

    .venv/bin/python scripts/bench_schedules.py [--steps 4] [--schedules 1f1b gpipe ...] [extra overrides]

Runs the real recipe under torchrun (2 processes) once per schedule without
validation or export, and prints the median optimizer-step time and tokens/s
(the first step, which builds the recv buffers, is skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zero_bubble", "zbv", "dualpipev"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_squad_pp2.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--schedules", nargs="*", default=ALL)
    args, extra = parser.parse_known_args()
    print(f"{'schedule':<18}{'median step s':>14}{'tokens/s':>10}{'loss':>9}")
    for schedule in args.schedules:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "recipes/finetune.py",
                   "--config", args.config, "--distributed.pipeline.pp_schedule", schedule,
                   "--step_scheduler.max_steps", str(args.steps), "--validation_dataset", "null",
                   "--checkpoint.save_consolidated", "false", "--checkpoint.enabled", "false", f"--checkpoint.checkpoint_dir={out}", *extra]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"TQDM_DISABLE": "1", **__import__("os").environ})
            if proc.returncode != 0:
                print(f"{schedule:<18} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
                continue
            train = [json.loads(l) for l in Path(out, "metrics.jsonl").read_text().splitlines()]
            train = [r for r in train if r.get("event") == "train"][1:]
            step = statistics.median(r["step_time_s"] for r in train)
            tps = statistics.median(r["tokens_per_s"] for r in train)
            print(f"{schedule:<18}{step:>14.2f}{tps:>10.0f}{train[-1]['loss']:>9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
