"""Where published layouts rank in the layout search, and predicted vs published throughput.

    .venv/bin/python scripts/compare_published.py [--only 70b-bf16 dsv3-256 ...]

For each published run (model config in ``nemo_pp/configs/models``, H100s, global batch,
sequence length, layout, tokens/s per GPU), ``nemo_pp.planning.search.plan_layouts`` plans
the same model, batch and GPU count on the stated H100 (``nemo_pp.planning.devices``); the
script prints the search's best layout and its prediction, the rank of the best-ranked
layout with the published axes (pp, tp, cp, ep, virtual stages per pp rank, microbatch),
and that layout's predicted tokens/s per GPU against the published one. No GPU is used.

Sources (numbers copied from them; see README, "Choosing the layout"):

* ``70b-fp8``: Megatron-Bridge, docs/performance-summary-archive.md, 25.11 container,
  DGX-H100: Llama3 70B, 64 GPUs, GBS 128, MBS 1, seq 8192, TP 4, PP 8, CP 1, VP 5, FP8-CS:
  1,602 tokens/s/GPU, 719 TFLOP/s/GPU (no BF16 run of this layout is published);
* ``70b-bf16``: NeMo AutoModel, docs/performance-summary.mdx, DGX-H100 BF16: Llama3 70B,
  64 GPUs, GBS 128, MBS 1, seq 8192, TP 1, PP 1, CP 2, FSDP 32: 866.77 tokens/s/GPU, 389
  TFLOP/s/GPU, 18.90 s per step;
* ``405b-fp8``: Megatron-Bridge, the same archive, 25.11: Llama3.1 405B, 1,024 GPUs, GBS
  512, MBS 1, seq 8192, TP 8, PP 8, CP 2, VP 8, FP8-CS: 292 tokens/s/GPU, 737 TFLOP/s/GPU
  (no throughput of 405B on 512 H100s is published);
* ``dsv3-256``: NeMo AutoModel, docs/performance-summary.mdx, DGX-H100 BF16: DeepSeek-V3
  671B, 256 GPUs, GBS 512, MBS 1, LBS 8, seq 4096, TP 1, PP 4, CP 1, VP 8, EP 64, FSDP 64,
  TE + DeepEP, a balanced fake gate: 1,002 tokens/s/GPU, 250 TFLOP/s/GPU, 8.18 s per step.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "nemo_pp/configs/llama3_1_70b_squad.yaml"


@dataclass(frozen=True)
class Published:
    """One published run."""

    key: str
    model: str
    gpus: int
    global_batch: int
    seq_len: int
    pp: int
    tp: int
    cp: int
    ep: int
    virtual_stages: int
    microbatch: int
    tokens_per_s_per_gpu: float
    precision: str
    source: str


RUNS = (
    Published("70b-fp8", "llama-3.1-70b", 64, 128, 8192, 8, 4, 1, 1, 5, 1, 1602, "FP8",
              "Megatron-Bridge 25.11 performance summary"),
    Published("70b-bf16", "llama-3.1-70b", 64, 128, 8192, 1, 1, 2, 1, 1, 4, 866.77, "BF16",
              "NeMo AutoModel performance summary"),
    Published("405b-fp8", "llama-3.1-405b", 1024, 512, 8192, 8, 8, 2, 1, 8, 1, 292, "FP8",
              "Megatron-Bridge 25.11 performance summary"),
    Published("dsv3-256", "deepseek-v3", 256, 512, 4096, 4, 1, 1, 64, 8, 1, 1002, "BF16",
              "NeMo AutoModel performance summary"),
)


def _matches(layout, run: Published) -> bool:
    return (layout.pp, layout.tp, layout.cp, layout.ep, layout.stages_per_rank) == (
        run.pp, run.tp, run.cp, run.ep, run.virtual_stages) and (run.pp == 1 or layout.microbatch_size == run.microbatch)


def compare(run: Published, data_dir: str) -> dict:
    """Plan ``run``'s model, batch and GPUs; return the comparison row."""
    from nemo_pp.config import parse_cli
    from nemo_pp.planning.devices import KNOWN_DEVICES
    from nemo_pp.planning.search import plan_layouts

    path, overrides = parse_cli([
        "--config", str(CONFIG), "--model.pretrained_model_name_or_path", "${nemo_pp_configs:}/models/" + run.model,
        "--dataset.path_or_dataset", data_dir, "--dataset.seq_length", str(run.seq_len),
        "--step_scheduler.global_batch_size", str(run.global_batch), "--dataloader.batch_size",
        str(run.global_batch // (run.gpus // (run.pp * run.tp * run.cp)))])
    result = plan_layouts(path, overrides, run.gpus // 8, 8, KNOWN_DEVICES["H100"], top=1, exhaustive=True)
    ranked = result.search_space
    match = next(((i, c) for i, c in enumerate(ranked, 1) if _matches(c.layout, run)), None)
    return {"run": run, "result": result, "best": ranked[0] if ranked else None, "match": match}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run keys (default: all)")
    args = parser.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as data_dir:  # planning reads no data: an empty folder will do
        for run in RUNS:
            if args.only and run.key not in args.only:
                continue
            row = compare(run, data_dir)
            rows.append(row)
            result, best, match = row["result"], row["best"], row["match"]
            print(f"\n{run.key}: {run.model}, {run.gpus} H100, GBS {run.global_batch}, seq {run.seq_len} "
                  f"({run.source}, {run.precision})\n  {result.summary()}")
            if best is not None:
                print(f"  best: {best.layout.describe()}: {best.tokens_per_s_per_device:.0f} tok/s/GPU, "
                      f"MFU {100 * best.mfu:.0f} %, {best.memory.total_bytes / 2**30:.0f} GiB")
            if match is None:
                print("  the published layout does not fit the memory model (or is not in the search space)")
            else:
                i, c = match
                err = 100 * (c.tokens_per_s_per_device - run.tokens_per_s_per_gpu) / run.tokens_per_s_per_gpu
                print(f"  published layout ranks {i} of {len(result.search_space)}: {c.layout.describe()}: predicted "
                      f"{c.tokens_per_s_per_device:.0f} tok/s/GPU (MFU {100 * c.mfu:.0f} %, "
                      f"{c.memory.total_bytes / 2**30:.0f} GiB) vs published {run.tokens_per_s_per_gpu:.0f} ({err:+.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
