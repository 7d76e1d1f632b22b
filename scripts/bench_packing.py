"""Non-padding tokens per second with and without sequence packing on the main job's data
(a benchmark, not a test).

    .venv/bin/python scripts/bench_packing.py [--steps 6]

Runs the main config (SmolLM2-135M, SQuAD at seq_length 256, pp 2, 8 microbatches per
step) unpacked, 8 samples per batch padded to the longest (a multiple of 16), and packed,
8 rows of 512 tokens each holding as many whole samples as fit. Prints the median step
time, tokens/s with padding, and non-padding tokens/s (the samples' own tokens).
"""

from __future__ import annotations

import argparse
import sys

from bench_common import timed_recipe_run

RUNS = [
    ("unpacked", ()),
    ("packed 512", ("--packed_sequence.packed_sequence_size=512",)),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    args, extra = parser.parse_known_args()
    print(f"{'run':<12}{'median step s':>15}{'tokens/s':>10}{'non-pad tokens/s':>18}")
    for name, overrides in RUNS:
        r = timed_recipe_run(2, args.steps, *overrides, *extra, threads=1)
        print(f"{name:<12}{r['step_s']:>15.2f}{r['tokens_per_s']:>10.0f}{r['nonpad_tokens_per_s']:>18.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
