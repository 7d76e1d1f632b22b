"""Per-step time of every pipeline schedule on the main job's config (a benchmark, not a test).

    .venv/bin/python scripts/bench_schedules.py [--steps 4] [--schedules 1f1b gpipe ...] [extra overrides]

Runs the real recipe under torchrun (2 processes) once per schedule without
validation or export, and prints the median optimizer-step time and tokens/s
(the first step, which builds the recv buffers, is skipped).
"""

from __future__ import annotations

import argparse
import sys

from bench_common import timed_recipe_run

ALL = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zero_bubble", "zbv", "dualpipev"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_squad_pp2.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--schedules", nargs="*", default=ALL)
    args, extra = parser.parse_known_args()
    print(f"{'schedule':<18}{'median step s':>14}{'tokens/s':>10}{'loss':>9}")
    for schedule in args.schedules:
        try:
            r = timed_recipe_run(2, args.steps, "--distributed.pipeline.pp_schedule", schedule, *extra, config=args.config)
        except RuntimeError as exc:
            print(f"{schedule:<18} failed: {exc}")
            continue
        print(f"{schedule:<18}{r['step_s']:>14.2f}{r['tokens_per_s']:>10.0f}{r['loss']:>9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
