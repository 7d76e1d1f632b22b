"""How close the main job comes to this machine's limit (a benchmark, not a test).

    .venv/bin/python scripts/bench_limit.py [--steps 6] [--variants plain fused compile+fused]

In one process tree: first the machine's fp32 GEMM peak (``[1024, 1024]^2``, best of 5) at
1 and at 2 threads; then the main job's real recipe (no validation, checkpoints or export)
at pp 1 (1 process x 2 threads) and pp 2 (2 processes x 1 thread) for each variant: the
plain path (``MaskedCrossEntropy``), the fused loss (``FusedLinearCrossEntropy``) and
regional compile on top (``compile.enabled``). For each it prints the median step, train
tokens/s, the achieved model FLOP/s (the cost model's FLOPs of the step's batches, no
recomputation) over the SAME tree's GEMM peak (2 threads for pp 1, 2 x 1 thread for pp 2),
the last stage's peak resident memory and the first step (compilation shows there).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_common import CONFIG, timed_recipe_run

VARIANTS = {
    "plain": (),
    "fused": ("--loss_fn._target_", "nemo_pp.loss.FusedLinearCrossEntropy"),
    "compile": ("--compile.enabled", "true"),
    "compile+fused": ("--loss_fn._target_", "nemo_pp.loss.FusedLinearCrossEntropy", "--compile.enabled", "true"),
}
LAYOUTS = {"pp1": (1, 2, ("--distributed.pp_size", "1")), "pp2": (2, 1, ())}


def gemm_peak_tflops(threads: int) -> float:
    from nemo_pp.planning.throughput import measure_gemm_tflops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_gemm_tflops(torch.float32, size=1024, repeats=5)
    finally:
        torch.set_num_threads(before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=["plain", "fused", "compile+fused"], choices=list(VARIANTS))
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--extra", nargs="*", default=[], help="more recipe overrides for every run, Hydra-style, e.g. "
                        "distributed.pipeline.split=uniform (the same split for every variant)")
    args = parser.parse_args()
    peaks = {1: gemm_peak_tflops(1), 2: gemm_peak_tflops(2)}
    print(f"fp32 GEMM peak: {1000 * peaks[1]:.1f} GFLOP/s at 1 thread, {1000 * peaks[2]:.1f} at 2 threads "
          f"({peaks[2] / peaks[1]:.2f}x); config {CONFIG}", flush=True)
    print("| layout | variant | step s | train tok/s | model GFLOP/s | of the GEMM peak | last stage peak GiB "
          "| first step s |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for variant in args.variants:
        for layout in args.layouts:
            nproc, threads, extra = LAYOUTS[layout]
            r = timed_recipe_run(nproc, args.steps, *extra, *VARIANTS[variant], *args.extra, config=CONFIG,
                                 threads=threads)
            peak = peaks[threads] * nproc  # the tree's peak: every process at its thread count
            base.setdefault(layout, r["tokens_per_s"])
            mem = r["peak_memory_bytes_by_rank"][-1] / 2**30 if r["peak_memory_bytes_by_rank"] else float("nan")
            print(f"| {layout} | {variant} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} "
                  f"({r['tokens_per_s'] / base[layout]:.2f}x) | {1000 * r['model_tflops']:.1f} | "
                  f"{100 * r['model_tflops'] / peak:.0f} % | {mem:.2f} | {r['first_step_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
