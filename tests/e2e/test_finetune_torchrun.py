"""The real command line: torchrun + recipes/finetune.py on the real SmolLM2 and SQuAD."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
CONFIG = "configs/smollm2_135m_squad_pp2.yaml"


def run_recipe(nproc: int, *overrides: str, timeout: float = 600, config: str = CONFIG,
               evaluation: bool = False) -> subprocess.CompletedProcess:
    """torchrun on ``config``; the scoring by generation off unless ``evaluation`` (it has its own test)."""
    off = [] if evaluation or config != CONFIG else ["--evaluation=null"]
    cmd = TORCHRUN + [f"--nproc_per_node={nproc}", "recipes/finetune.py", "--config", config, *off, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.parametrize("pp_size", [2, 1])
def test_finetune_exports_a_model_transformers_reloads(real_assets, tmp_path, pp_size):
    """pp_size 2 (two stages on two processes) and 1 (the same recipe, no pipeline)."""
    out = tmp_path / "run"
    proc = run_recipe(
        pp_size,
        f"--distributed.pp_size={pp_size}",
        f"--checkpoint.checkpoint_dir={out}",
        "--step_scheduler.max_steps", "2",
        "--step_scheduler.global_batch_size", "2",
        "--dataloader.batch_size", "2",
        "--dataset.seq_length", "96",
        "--dataset.limit_dataset_samples", "64",
        "--validation_dataset.seq_length", "96",
        "--validation_dataset.limit_dataset_samples", "4",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(out)
    train = [r for r in records if r["event"] == "train"]
    summary = records[-1]
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert summary["event"] == "summary" and summary["val_loss_after"] is not None
    saved = (out / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "seq_length: 96" in saved  # overrides reach the saved config

    # the consolidated export is a normal HF folder, the tie preserved, one tensor stored
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = out / "hf_model"
    keys = set()
    for f in export.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # its validation loss equals the one the pipelined model reported after training
    from nemo_pp.datasets.llm.squad import SQuAD
    from nemo_pp.datasets.utils import default_collater

    tok = AutoTokenizer.from_pretrained(export)
    val = SQuAD(str(real_assets[1]), "validation", tokenizer=tok, seq_length=96, limit_dataset_samples=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, 4, 2):
            b = default_collater([val[i], val[i + 1]], pad_seq_len_divisible=16, pad_token_id=tok.pad_token_id)
            logits = model(input_ids=b["input_ids"]).logits
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((b["labels"] != -100).sum())
    assert abs(total / count - summary["val_loss_after"]) < 1e-4, (total / count, summary["val_loss_after"])


@pytest.mark.e2e
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--distributed.pp_sise", "2"], "did you mean 'distributed.pp_size'"),
        (["--distributed.pipeline.pp_schedule", "2f2b"], "Valid schedules: GPipe, 1F1B"),
        (["--dataloader.batch_size", "1", "--step_scheduler.global_batch_size", "1"],
         "1F1B needs at least as many microbatches as stages"),
        (["+peft={target_modules: [qkv_proj]}"], "match no linear module of the model"),
        (["--dataset.seq_length", "100000"], "exceeds the model's max_position_embeddings"),
    ],
)
def test_bad_input_fails_fast_on_every_rank(real_assets, tmp_path, overrides, message):
    proc = run_recipe(2, f"--checkpoint.checkpoint_dir={tmp_path}", *overrides, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr + proc.stdout  # failed before any weight was read


@pytest.mark.e2e
def test_empty_validation_split_fails_fast_with_the_key(real_assets, tmp_path):
    """The data set is built after the process group exists: the run still ends at once with
    the key (that every rank raises it is tested on forked ranks in test_pipeline_options)."""
    proc = run_recipe(2, f"--checkpoint.checkpoint_dir={tmp_path}", "--validation_dataset.split", "test", timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "] error: validation_dataset" in line]
    assert len(errors) >= 1, proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr + proc.stdout


@pytest.mark.e2e
def test_max_steps_0_validates_and_exports_without_training(real_assets, tmp_path):
    """Also: split: profile times the pieces on rank 0 and every rank plans with them; the
    evaluation section scores the pretrained model once (never trained: the same weights after)."""
    out = tmp_path / "run"
    proc = run_recipe(
        2, f"--checkpoint.checkpoint_dir={out}", "--step_scheduler.max_steps", "0",
        "--distributed.pipeline.split", "profile",
        "--validation_dataset.seq_length", "96", "--validation_dataset.limit_dataset_samples", "8",
        "--dataset.limit_dataset_samples", "16", "--evaluation.num_samples", "4", evaluation=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(out)
    assert not [r for r in records if r["event"] == "train"]
    summary = records[-1]
    assert summary["steps"] == 0 and summary["val_loss_before"] == summary["val_loss_after"] is not None
    assert (out / "hf_model" / "config.json").is_file()
    assert "stage 1 (pp_rank 1)" in proc.stdout  # the plan is printed before the run
    assert "split: profile: fwd+bwd per microbatch" in proc.stdout  # timed on rank 0, shared
    scored = [r for r in records if r["event"] == "evaluation"]
    assert [(r["tag"], r["samples"]) for r in scored] == [("pretrained", 4)], scored
    assert summary["exact_match_after"] == summary["exact_match_before"] == scored[0]["exact_match"]
    assert "evaluation (pretrained, step 0): exact match" in proc.stdout and "exact match " in proc.stdout


@pytest.mark.e2e
@pytest.mark.slow  # about a minute or more on 2 cores
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_pp2_x_tp3_on_six_processes_trains_and_exports(real_assets, tmp_path, sequence_parallel):
    """SmolLM2's 9 heads and 3 kv heads split over tp 3 inside each of 2 stages; with
    sequence parallelism the stages exchange [B, S/3, H] shards (sequences padded to 48)."""
    out = tmp_path / "run"
    sp = ["--distributed.sequence_parallel=true", "--dataloader.pad_seq_len_divisible=48"] if sequence_parallel else []
    proc = run_recipe(
        6, "--distributed.tp_size=3", *sp, f"--checkpoint.checkpoint_dir={out}", "--step_scheduler.max_steps=3",
        "--step_scheduler.global_batch_size=2", "--dataloader.batch_size=2", "--dataset.seq_length=64",
        "--dataset.limit_dataset_samples=64", "--validation_dataset.limit_dataset_samples=2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pp 2 x dp_replicate 1 x dp_shard 1 x cp 1 x tp 3 = 6 ranks" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if r["event"] == "train"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    # the same numbers as without tensor parallelism (pp 2 alone, measured): 6.4728, 3.9824, 1.8804
    assert losses == pytest.approx([6.4728, 3.9824, 1.8804], abs=2e-3)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf_model", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(k.startswith("_") or "DTensor" in type(v).__name__ for k, v in model.state_dict().items())


@pytest.mark.e2e
@pytest.mark.slow  # about a minute or more on 2 cores
def test_pp2_x_cp2_on_four_processes_matches_pp2(real_assets, tmp_path):
    """Each of 2 stages runs on 2 cp ranks holding a head and a mirrored tail quarter of every
    sequence (all-gather attention on the CPU): the step-1 loss equals the pp 2 run's."""
    common = ["--step_scheduler.max_steps=3", "--step_scheduler.global_batch_size=2", "--dataloader.batch_size=2",
              "--dataset.seq_length=96", "--dataset.limit_dataset_samples=64",
              "--validation_dataset.limit_dataset_samples=2", "--checkpoint.enabled=false"]
    runs = {}
    for name, nproc, extra in (("pp2", 2, []), ("pp2xcp2", 4, ["--distributed.cp_size=2"])):
        out = tmp_path / name
        proc = run_recipe(nproc, *extra, *common, f"--checkpoint.checkpoint_dir={out}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = [r["loss"] for r in read_metrics(out) if r["event"] == "train"]
        if name == "pp2xcp2":
            assert "cp 2 x tp 1 = 4 ranks" in proc.stdout and "allgather attention" in proc.stdout
    cp = runs["pp2xcp2"]
    assert len(cp) == 3 and cp[0] > cp[1] > cp[2]
    assert abs(cp[0] - runs["pp2"][0]) < 1e-4, runs
    assert cp == pytest.approx(runs["pp2"], abs=1e-3)


@pytest.mark.e2e
def test_lora_config_trains_and_its_adapter_reloads_with_peft(real_assets, tmp_path):
    """The shipped LoRA config as it is (2 processes, 2 stages), fewer steps: validation
    loss falls, checkpoints hold only the adapters, and peft loads the adapter folder onto
    the base model with the loss the run reported."""
    out = tmp_path / "run"
    proc = run_recipe(
        2, f"--checkpoint.checkpoint_dir={out}", "--step_scheduler.max_steps=4", "--step_scheduler.ckpt_every_steps=2",
        "--dataset.seq_length=96", "--dataset.limit_dataset_samples=64", "--validation_dataset.seq_length=96",
        "--validation_dataset.limit_dataset_samples=8", config="configs/smollm2_135m_squad_pp2_lora.yaml",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LoRA: 2,442,240 trainable parameters of 134,515,008" in proc.stdout
    summary = read_metrics(out)[-1]
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.5, summary

    from safetensors import safe_open

    with safe_open(str(out / "hf_adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 30 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    ckpt = out / "epoch_0_step_4"
    assert sum(f.stat().st_size for f in (ckpt / "model").glob("*.distcp")) < 2 * 4 * 2_442_240

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_pp.datasets.llm.squad import SQuAD
    from nemo_pp.datasets.utils import default_collater

    smollm2, squad = real_assets
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                      out / "hf_adapter")
    tok = AutoTokenizer.from_pretrained(smollm2)
    val = SQuAD(str(squad), "validation", tokenizer=tok, seq_length=96, limit_dataset_samples=8)
    b = default_collater([val[i] for i in range(8)], pad_seq_len_divisible=16, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                             ignore_index=-100)
    assert abs(float(loss) - summary["val_loss_after"]) < 1e-4, (float(loss), summary["val_loss_after"])


@pytest.mark.e2e
@pytest.mark.parametrize("fmt,seq,pack", [("instructions", 64, 0), ("chat", 128, 0), ("shakespeare", 64, 0),
                                          pytest.param("instructions", 64, 256, marks=pytest.mark.slow)])
def test_each_data_format_config_trains_with_falling_validation_loss(real_assets, tmp_path, fmt, seq, pack):
    """The shipped config of each data format (column-mapped instructions, chat, plain
    text), as it is on the real model and data, for a few short steps; and the
    instruction set packed into rows of 256 tokens."""
    out = tmp_path / "run"
    proc = run_recipe(
        2, f"--checkpoint.checkpoint_dir={out}", "--step_scheduler.max_steps=4", "--checkpoint.enabled=false",
        "--checkpoint.save_consolidated=false", f"--dataset.seq_length={seq}",
        f"--dataset.limit_dataset_samples={160 if pack else 64}", f"--validation_dataset.seq_length={seq}",
        "--validation_dataset.limit_dataset_samples=8", f"--packed_sequence.packed_sequence_size={pack}",
        config=f"configs/smollm2_135m_{fmt}_pp2.yaml",
    )
    if pack:
        assert "packed_sequence: 160 samples in" in proc.stdout, proc.stdout[-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(out)
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 4 and all(r["num_label_tokens"] > 0 for r in train)
    if pack:  # rows of several samples: most of each 256-token row is real tokens
        assert all(r["nonpad_tokens_per_s"] > 0.6 * r["tokens_per_s"] for r in train), train
    summary = records[-1]
    assert summary["val_loss_after"] < summary["val_loss_before"], summary
