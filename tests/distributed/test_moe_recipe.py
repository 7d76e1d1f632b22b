"""The real recipe (``recipes/finetune.py`` ``main`` on forked gloo ranks) on a sparsely
upcycled mixture of experts (the tiny Llama of ``tiny_assets`` as a 4-expert Mixtral, saved
in transformers' per-expert layout): pp 2 x dp 2 with the router's load-balancing loss logs
the LM and auxiliary losses apart and the expert load, exports in the family's own layout,
and its checkpoint resumes at pp 1 with the next losses equal (the loss is per sequence, so
the objective is the same at every layout). TensorBoard and the plot script show the
auxiliary loss and the expert load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import launch_recipe, recipe_overrides

EXTRA = ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6", "--dataloader.batch_size=2",
         "--step_scheduler.global_batch_size=4", "--logging.expert_load_every_steps=2",
         "--model.router_aux_loss_coef=0.1")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_resumed_losses_equal(train: list[dict], other: Path) -> dict:
    """The run resumed in ``other`` from step 3 logs steps 4-6 with the losses of ``train``."""
    resumed = {r["step"]: r for r in _records(other) if r["event"] == "train"}
    assert sorted(resumed) == [4, 5, 6]
    for r in train[3:]:
        assert abs(r["loss"] - resumed[r["step"]]["loss"]) <= 1e-5, (r, resumed[r["step"]])
        assert abs(r["aux_loss"] - resumed[r["step"]]["aux_loss"]) <= 1e-5, (r, resumed[r["step"]])
    return resumed


def _check_tensorboard_and_plot(out: Path, train: list[dict], loads: list[dict], tmp_path: Path) -> None:
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import ROOT

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("train/aux_loss")] == [round(r["aux_loss"], 5) for r in train]
    assert [e.step for e in events.Scalars("experts/max_imbalance")] == [r["step"] for r in loads]
    assert "experts/layer_7_imbalance" in events.Tags()["scalars"]
    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(out / "metrics.jsonl"),
                           "-o", str(png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.stat().st_size > 10_000, proc.stderr


@pytest.mark.parametrize("ep", [1, 2])
def test_upcycled_moe_trains_at_pp2_x_dp2_exports_and_resumes_at_another_ep(tiny_moe_assets, tmp_path, ep):
    """ep 1: every rank holds all experts, and its checkpoint resumes at pp 2 x ep 2 (each rank
    then loads half of them); ep 2: each dp rank holds half of them (the checkpoint's expert
    tensors are DTensor shards) and the checkpoint resumes whole at pp 1."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, squad = tiny_moe_assets
    straight = tmp_path / "straight"
    launch_recipe(4, recipe_overrides(model, squad, straight, *EXTRA, "+tensorboard={}", f"--distributed.ep_size={ep}"))
    records = _records(straight)
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # experts start as copies and the routers are random: the load-balancing loss is about top_k = 2
    assert all(1.9 < r["aux_loss"] < 2.5 for r in train), [r["aux_loss"] for r in train]
    loads = [r for r in records if r["event"] == "expert_load"]
    assert [r["step"] for r in loads] == [2, 4, 6]
    assert [row["layer"] for row in loads[0]["layers"]] == list(range(8))
    # 2 steps x 4 samples x (32 positions at most) x top 2 assignments per layer
    assert all(0 < sum(row["tokens"]) <= 2 * 4 * 32 * 2 for r in loads for row in r["layers"])
    assert all(1.0 <= row["imbalance"] <= 4.0 for r in loads for row in r["layers"])
    _check_tensorboard_and_plot(straight, train, loads, tmp_path)

    export = straight / "hf_model"
    keys = set()
    for f in export.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    with safe_open(str(next(Path(model).glob("*.safetensors"))), framework="pt") as h:
        assert keys == set(h.keys())  # the layout save_pretrained wrote: experts one by one
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert reloaded.config.output_router_logits and reloaded.config.router_aux_loss_coef == 0.1

    other = tmp_path / "other_layout"
    other.mkdir()
    step3 = next(straight.glob("epoch_*_step_3"))
    shutil.copytree(step3, other / step3.name)
    if ep == 1:
        launch_recipe(4, recipe_overrides(model, squad, other, *EXTRA, "--distributed.ep_size=2"))
    else:
        launch_recipe(1, recipe_overrides(model, squad, other, *EXTRA, "--distributed.pp_size=1",
                                          "--dataloader.batch_size=4"))
    resumed = _assert_resumed_losses_equal(train, other)
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in train[3:]]),
        torch.tensor([resumed[s]["grad_norm"] for s in (4, 5, 6)]), rtol=1e-4, atol=1e-5)


def test_experts_sharded_over_ep_shard_export_and_resume_at_tp2_x_ep2(tiny_moe_assets, tmp_path):
    """pp 1 x dp 4 at ep 2: the experts are FSDP2-sharded again over the ep_shard pairs (DTensors
    on the 2-D (ep_shard, ep) mesh, ``_StridedShard`` on dim 0). Their DCP checkpoint resumes at
    tp 2 x ep 2 (ep_shard 1, the attention tensor-parallel) with the next losses equal, and the
    export gathers them whole."""
    from transformers import AutoModelForCausalLM

    model, squad = tiny_moe_assets
    straight = tmp_path / "straight"
    layout = ("--distributed.pp_size=1", "--distributed.ep_size=2", "--dataloader.batch_size=1")
    launch_recipe(4, recipe_overrides(model, squad, straight, *EXTRA, *layout))
    train = [r for r in _records(straight) if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    reloaded = AutoModelForCausalLM.from_pretrained(straight / "hf_model")
    source = AutoModelForCausalLM.from_pretrained(model)
    moved = [n for n, p in reloaded.named_parameters() if "experts" in n
             and not torch.equal(p, dict(source.named_parameters())[n])]
    assert moved, "the exported experts are the trained ones"

    other = tmp_path / "other_layout"
    other.mkdir()
    step3 = next(straight.glob("epoch_*_step_3"))
    shutil.copytree(step3, other / step3.name)
    launch_recipe(4, recipe_overrides(model, squad, other, *EXTRA, "--distributed.pp_size=1", "--distributed.tp_size=2",
                                      "--distributed.ep_size=2"))
    _assert_resumed_losses_equal(train, other)
