"""Throughput of pipeline vs tensor parallelism on a tiny-shaped model (a benchmark, not a test).

    .venv/bin/python scripts/bench_tp.py [--steps 6] [--hidden 512] [--layers 8] [extra overrides]

Writes a random Llama of the given shape (SmolLM2's vocabulary and tokenizer, tied
embeddings) to a temporary folder and runs the real recipe under torchrun at
pp2 x tp1 (2 processes), pp1 x tp2 (2 processes) and pp2 x tp2 (4 processes) on the
same global batch. It prints the median optimizer-step time and tokens/s (the first
step is skipped) and the last loss, which must agree across layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [("pp2 x tp1", 2, 2, 1), ("pp1 x tp2", 2, 1, 2), ("pp2 x tp2", 4, 2, 2)]


def make_model(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nemo_pp.assets import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_squad_pp2.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model, args.hidden, args.layers)
        print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab 49152; batch 8 x 256 tokens per step")
        print(f"{'layout':<12}{'procs':>6}{'median step s':>15}{'tokens/s':>10}{'loss':>9}")
        for name, procs, pp, tp in LAYOUTS:
            out = Path(tmp) / name.replace(" ", "")
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "recipes/finetune.py",
                   "--config", args.config, f"--model.pretrained_model_name_or_path={model}",
                   f"--distributed.pp_size={pp}", f"--distributed.tp_size={tp}",
                   "--step_scheduler.max_steps", str(args.steps), "--validation_dataset", "null",
                   "--checkpoint.save_consolidated", "false", "--checkpoint.enabled", "false",
                   f"--checkpoint.checkpoint_dir={out}", *extra]
            env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{name:<12} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
                continue
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if r.get("event") == "train"][1:]
            step = statistics.median(r["step_time_s"] for r in train)
            tps = statistics.median(r["tokens_per_s"] for r in train)
            print(f"{name:<12}{procs:>6}{step:>15.2f}{tps:>10.0f}{train[-1]['loss']:>9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
