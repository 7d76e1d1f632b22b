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
import sys
import tempfile
from pathlib import Path

from bench_common import timed_recipe_run

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
        print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab 49152; the config's batch (main job: 8 x 256 tokens)")
        print(f"{'layout':<12}{'procs':>6}{'median step s':>15}{'tokens/s':>10}{'loss':>9}")
        for name, procs, pp, tp in LAYOUTS:
            try:
                r = timed_recipe_run(procs, args.steps, f"--model.pretrained_model_name_or_path={model}",
                                     f"--distributed.pp_size={pp}", f"--distributed.tp_size={tp}", *extra,
                                     config=args.config, threads=1)
            except RuntimeError as exc:
                print(f"{name:<12} failed: {exc}")
                continue
            print(f"{name:<12}{procs:>6}{r['step_s']:>15.2f}{r['tokens_per_s']:>10.0f}{r['loss']:>9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
