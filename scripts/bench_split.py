"""Throughput of the main job at pp 1 and pp 2, uniform vs balanced split (a benchmark, not a test).

    .venv/bin/python scripts/bench_split.py [--steps 5] [--microbatches 4 8]

Runs the real recipe on the same batches: pp 1 as 1 process with 2 threads, pp 2 as 2
processes with 1 thread each (this machine has 2 cores), with the 1F1B schedule, for
each split and microbatch count (the global batch stays 8: 4 microbatches accumulate 2
batches, 8 microbatches take one). Prints the median optimizer-step time after the
first step, tokens/s, the ratio to pp 1, and the step time the inspector's cost model
predicts for the split (each piece timed once on this machine at the config's full
sequence length, the schedule simulated; batches are padded to their longest sample, so
the real steps are somewhat shorter).
"""

from __future__ import annotations

import argparse
import sys

from bench_common import CONFIG, timed_recipe_run


def run(nproc: int, threads: int, steps: int, *overrides: str) -> tuple[float, float]:
    """Median step seconds and tokens/s over steps 2.. of the real recipe."""
    r = timed_recipe_run(nproc, steps, *overrides, config=CONFIG, threads=threads)
    return r["step_s"], r["tokens_per_s"]


_PIECES = {}


def predicted_step_seconds(split: str, microbatches: int) -> float:
    """The cost model's optimizer-step time: pieces timed once on 1 thread, stages from the
    recipe's own plan, the schedule simulated, times the accumulated batches."""
    import torch

    from nemo_pp.config import parse_cli
    from nemo_pp.planning.cost import profile_costs, stage_costs_of_plan
    from nemo_pp.planning.run_plan import plan_run
    from nemo_pp.planning.schema import load_recipe_config
    from nemo_pp.planning.timeline import simulated_step_seconds

    path, overrides = parse_cli(["--config", CONFIG, "--distributed.pp_size=2", f"--distributed.pipeline.split={split}",
                                 f"--dataloader.batch_size={microbatches}"])
    cfg = load_recipe_config(path, overrides)
    run_plan = plan_run(cfg, 2)
    if "pieces" not in _PIECES:
        from transformers import AutoConfig

        torch.set_num_threads(1)
        _PIECES["pieces"] = profile_costs(AutoConfig.from_pretrained(run_plan.model_path), 1, cfg.dataset.seq_length)
    stages = stage_costs_of_plan(run_plan.pipeline, _PIECES["pieces"])
    return simulated_step_seconds(run_plan.pipeline, stages) * run_plan.grad_acc_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--microbatches", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--splits", nargs="*", default=["uniform", "balanced"])
    args = parser.parse_args()
    print(f"{'run':<34}{'step s':>8}{'tok/s':>8}{'vs pp 1':>9}{'predicted s':>13}", flush=True)
    results = {}
    for mb in args.microbatches:
        batch = [f"--dataloader.batch_size={mb}"]
        step, tps = run(1, 2, args.steps, "--distributed.pp_size=1", *batch)
        results[("pp1", mb)] = tps
        print(f"{f'pp 1, 1 proc x 2 threads, batch {mb}':<34}{step:>8.2f}{tps:>8.0f}{1.0:>9.2f}{'':>13}", flush=True)
        for split in args.splits:
            step, tps = run(2, 1, args.steps, "--distributed.pp_size=2", f"--distributed.pipeline.split={split}", *batch)
            predicted = predicted_step_seconds(split, mb)
            print(f"{f'pp 2 {split}, {mb} microbatches':<34}{step:>8.2f}{tps:>8.0f}{tps / results[('pp1', mb)]:>9.2f}"
                  f"{predicted:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
