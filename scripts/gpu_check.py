"""The GPU acceptance check: CUDA-only tests, then a bf16 recipe on a ~1.5B synthetic Llama.

    bash scripts/gpu_check.sh            # on a machine with one H100/H200-class GPU, < 8 minutes
    .venv/bin/python scripts/gpu_check.py --plan-only   # anywhere: the run's plan and memory prediction

Without a CUDA device it prints "no CUDA device" and exits 0 having run nothing. With one:

1. the tests that need CUDA (``-k cuda or cce``; the rest of the suite is the CPU's);
2. a synthetic Llama (hidden 2048, 16 layers, GQA 32/8 heads, MLP 8192, Llama-3's 128,256
   vocabulary: 1.5 B parameters, random bf16 weights, a word-level tokenizer) written to a
   temporary folder with a generated text corpus, and the real recipe through ``torchrun``
   on it: pp 1 with the interleaved 1F1B schedule's 2 virtual stages on the one rank, the
   fused linear cross-entropy, regional compile and activation checkpointing, 4,096-token
   blocks, 8 microbatches of 1;
3. a table: median step time, tokens/s, model TFLOP/s, MFU (against the data-sheet bf16
   peak), peak ``torch.cuda.max_memory_allocated`` against the memory plan's prediction.
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
LLAMA = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
             rope_theta=500000.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SEQ_LEN = 4096
STEPS = 8

CONFIG = """
distributed:
  pp_size: 1
  pipeline:
    pp_schedule: interleaved_1f1b
    pp_microbatch_size: 1
    layers_per_stage: 8       # 2 virtual stages on the one rank
  activation_checkpointing: true
model:
  _target_: nemo_pp.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: {model}
  torch_dtype: bfloat16
loss_fn:
  _target_: nemo_pp.loss.FusedLinearCrossEntropy
compile:
  enabled: true
dataset:
  _target_: nemo_pp.datasets.llm.plain_text_dataset.PlainTextDataset
  path_or_dataset_id: {data}
  seq_length: {seq_len}
dataloader:
  batch_size: 8
step_scheduler:
  global_batch_size: 8
  max_steps: {steps}
checkpoint:
  enabled: false
  save_consolidated: false
  checkpoint_dir: {out}
optimizer:
  _target_: torch.optim.AdamW
  lr: 1.0e-5
"""


def write_model(folder: Path, weights: bool) -> None:
    """config.json, a word-level tokenizer and (``weights``) random bf16 safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**LLAMA)
    words = [f"w{i}" for i in range(4000)]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(folder)
    if not weights:
        config.save_pretrained(folder)
        return
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def write_corpus(folder: Path, tokens: int) -> None:
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paragraphs = [" ".join(f"w{rng.randrange(4000)}" for _ in range(500)) for _ in range(tokens // 500 + 1)]
    (folder / "train.txt").write_text("\n\n".join(paragraphs) + "\n")


def config_file(work: Path) -> Path:
    path = work / "gpu_check.yaml"
    path.write_text(CONFIG.format(model=work / "model", data=work / "data", seq_len=SEQ_LEN, steps=STEPS,
                                  out=work / "out"))
    return path


def predicted_peak_bytes(path: Path) -> tuple[int, str]:
    """The memory plan's bytes for the one rank, and the plan's description."""
    from nemo_pp.loss import FusedLinearCrossEntropy
    from nemo_pp.planning.memory import memory_plan
    from nemo_pp.planning.run_plan import plan_run
    from nemo_pp.planning.schema import load_recipe_config

    cfg = load_recipe_config(path, [])
    plan = plan_run(cfg, world_size=1, check_checkpoint=False)
    rank = memory_plan(plan.meta_model, plan.pipeline, SEQ_LEN, activation_checkpointing=True,
                       loss_fn=FusedLinearCrossEntropy())[0]
    return rank.total_bytes, plan.describe()


def run(cmd: list[str], **kw) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-only", action="store_true", help="plan the check's run (no GPU needed) and stop")
    args = parser.parse_args()
    import torch

    if not args.plan_only and not torch.cuda.is_available():
        print("no CUDA device: the GPU acceptance check ran nothing (exit 0)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(work / "model", weights=not args.plan_only)
        write_corpus(work / "data", SEQ_LEN * 8 * (STEPS + 1))
        path = config_file(work)
        predicted, description = predicted_peak_bytes(path)
        print(description)
        print(f"memory plan: {predicted / 2**30:.2f} GiB on the one rank", flush=True)
        if args.plan_only:
            return 0
        tests = run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/unit/test_linear_ce.py",
                     "tests/distributed/test_context_parallel.py", "-k", "cuda or cce or ring"])
        env = {**os.environ, "TQDM_DISABLE": "1"}
        rc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "recipes/finetune.py",
                  "--config", str(path)], env=env)
        if rc != 0:
            print(f"the recipe failed (exit {rc})")
            return rc
        records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("event") == "train"]
        steady = train[2:] or train
        mfu = statistics.median(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None
        peak = max(r["peak_memory_bytes"] for r in train)
        print("\n| metric | value |\n|---|---|")
        print(f"| device | {torch.cuda.get_device_name(0)} |")
        print(f"| first step (compile) s | {train[0]['step_time_s']:.1f} |")
        print(f"| step time s (median, steps 3..) | {statistics.median(r['step_time_s'] for r in steady):.3f} |")
        print(f"| tokens/s | {statistics.median(r['tokens_per_s'] for r in steady):,.0f} |")
        print(f"| model TFLOP/s | {statistics.median(r['tflops'] for r in steady):.1f} |")
        print(f"| MFU | {'n/a' if mfu is None else f'{100 * mfu:.1f} %'} |")
        print(f"| peak max_memory_allocated GiB | {peak / 2**30:.2f} |")
        print(f"| memory plan GiB | {predicted / 2**30:.2f} ({100 * (predicted - peak) / peak:+.0f} %) |")
        print(f"| CUDA-only tests | {'passed' if tests == 0 else f'FAILED (exit {tests})'} |")
        return tests


if __name__ == "__main__":
    sys.exit(main())
