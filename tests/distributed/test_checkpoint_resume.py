"""Exact resume: the real recipe (``recipes/finetune.py`` ``main``) on forked gloo ranks,
a tiny tied Llama with the SmolLM2 tokenizer, SQuAD from the prepared assets.

Each case trains 6 steps straight, then 3 steps stopped by SIGTERM (sent to one rank
only: the ranks agree, checkpoint at the step boundary and exit cleanly) and the same
command again, which resumes. Losses of steps 4-6 and the exported weights must equal
the straight run's; a checkpoint written at pp 2 must resume at pp 1 and pp 4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import launch_recipe, recipe_overrides, run_recipe_rank


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _stopped_and_resumed(model, squad, base: Path, world: int, extra: tuple) -> Path:
    """3 steps stopped by SIGTERM on rank 1, then the same command again (it resumes)."""
    out = base / "resumed"
    argv = recipe_overrides(model, squad, out, *extra)
    launch_recipe(world, argv, sigterm_after_step=3)
    assert [c.name for c in sorted(out.glob("epoch_*"))] == [_step3_name(out)]
    assert max(_losses(out)) == 3 and not (out / "hf_model").exists()  # stopped after step 3, no export
    launch_recipe(world, argv)
    return out


def _step3_name(out: Path) -> str:
    return next(out.glob("epoch_*_step_3")).name


CASES = {
    # two epochs of 3 steps: the checkpoint lands exactly on the epoch boundary
    "pp2-1f1b-epoch-boundary": (2, ("--dataset.limit_dataset_samples=12", "--step_scheduler.num_epochs=2",
                                    "--step_scheduler.max_steps=null", "--dataloader.batch_size=4",
                                    "--step_scheduler.global_batch_size=4")),
    # 4 stages on 2 ranks (virtual stages), resumed mid-epoch
    "pp2-interleaved": (2, ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6",
                            "--distributed.pipeline.pp_schedule=interleaved1f1b", "--dataloader.batch_size=4",
                            "--step_scheduler.global_batch_size=4", "--checkpoint.save_consolidated=every")),
    # FSDP2 over 2 data-parallel ranks under a 2-stage pipeline: sharded DTensor state
    "pp2-dp2-fsdp2": (4, ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6",
                          "--dataloader.batch_size=2", "--step_scheduler.global_batch_size=4",
                          "--checkpoint.max_recent_checkpoints=1")),
    # context parallelism: 2 cp ranks per stage, FSDP2 shards over them (dp_shard_cp)
    "pp2-cp2": (4, ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6",
                    "--dataloader.batch_size=4", "--step_scheduler.global_batch_size=4", "--distributed.cp_size=2")),
    # the model as safetensors, both files written by background threads
    "pp2-safetensors-async": (2, ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6",
                                  "--dataloader.batch_size=4", "--step_scheduler.global_batch_size=4",
                                  "--checkpoint.model_save_format=safetensors", "--checkpoint.is_async=true")),
    # LoRA: checkpoints hold the adapters only (the base weights are re-read from the model folder)
    "pp2-lora": (2, ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6",
                     "--dataloader.batch_size=4", "--step_scheduler.global_batch_size=4",
                     "+peft._target_=nemo_automodel.components._peft.lora.PeftConfig", "+peft.dim=4",
                     "+peft.alpha=8", "--checkpoint.save_merged_model=true")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_straight_run(tiny_assets, tmp_path, case):
    model, squad = tiny_assets
    world, extra = CASES[case]
    straight = tmp_path / "straight"
    launch_recipe(world, recipe_overrides(model, squad, straight, *extra))
    resumed = _stopped_and_resumed(model, squad, tmp_path, world, extra)

    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa, wb = _weights(straight / "hf_model"), _weights(resumed / "hf_model")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)
    # the straight run changed the weights: equality above is not of two untrained models
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], _weights(model)["model.layers.0.mlp.up_proj.weight"])

    if any(e.startswith("+peft.") for e in extra):
        _check_lora_outputs(straight, model, wa)

    kept = [c.name for c in sorted(straight.glob("epoch_*"))]
    if "--checkpoint.max_recent_checkpoints=1" in extra:
        assert kept == ["epoch_0_step_6"]
    else:
        assert len(kept) == 2
    if "--checkpoint.save_consolidated=every" in extra:
        # each checkpoint carries a Hugging Face folder of its weights; transformers loads it, tie intact
        from transformers import AutoModelForCausalLM

        consolidated = straight / "epoch_0_step_6" / "model" / "consolidated"
        for name, tensor in _weights(consolidated).items():
            torch.testing.assert_close(tensor, wa[name], rtol=0, atol=0)
        hf = AutoModelForCausalLM.from_pretrained(consolidated)
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        torch.testing.assert_close(hf.lm_head.weight.detach(), wa["model.embed_tokens.weight"], rtol=0, atol=0)


def _check_lora_outputs(out: Path, base: Path, merged: dict[str, torch.Tensor]) -> None:
    """A LoRA run's checkpoint holds adapters only; its adapter folder, loaded by peft onto
    the base model, computes what the merged export computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemo_pp.checkpoint.safe_metadata import read_metadata, tensor_shapes

    saved = tensor_shapes(read_metadata(out / "epoch_0_step_6" / "model", "torch_save"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:5]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "hf_adapter")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # the head has no adapter: the tie stays
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


OTHER_LAYOUTS = {
    "pp1": (1, ("--distributed.pp_size=1",)),
    "pp4": (4, ("--distributed.pp_size=4",)),
    # the same global batch over 2 data-parallel ranks: FSDP2 shards what pp 2 x dp 1 wrote whole
    "pp2-dp2-fsdp2": (4, ("--dataloader.batch_size=2",)),
    # each sequence split over 2 cp ranks: FSDP2 shards over them what pp 2 wrote whole
    "pp2-cp2": (4, ("--distributed.cp_size=2",)),
}


@pytest.mark.parametrize("layout", list(OTHER_LAYOUTS))
def test_pp2_checkpoint_resumes_at_another_layout(tiny_assets, tmp_path, layout):
    """The checkpoint of a pp 2 run (after 3 steps) resumes at pp 1, pp 4, pp 2 x dp 2 and pp 2 x cp 2:
    the next losses equal the uninterrupted pp 2 run's."""
    model, squad = tiny_assets
    extra = ("--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=6", "--dataloader.batch_size=4",
             "--step_scheduler.global_batch_size=4")
    straight = tmp_path / "straight"
    # written in the background while steps 4-6 train: the checkpoint must be the state after step 3
    launch_recipe(2, recipe_overrides(model, squad, straight, *extra, "--checkpoint.is_async=true"))
    other = tmp_path / layout
    other.mkdir()
    shutil.copytree(straight / _step3_name(straight), other / _step3_name(straight))
    world, changes = OTHER_LAYOUTS[layout]
    launch_recipe(world, recipe_overrides(model, squad, other, *extra, *changes))

    a, b = _losses(straight), _losses(other)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def _crash_while_saving_step_6(argv):
    """The recipe on one process, SIGKILLed once the step-6 checkpoint's optimizer shards
    are on disk but before its index, rename and marker."""
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
    original = dcp.FileSystemWriter.write_data

    def write_data(self, plan, planner):
        future = original(self, plan, planner)
        if "step_6" in str(self.path) and str(self.path).endswith("optim"):
            future.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return future

    dcp.FileSystemWriter.write_data = write_data
    run_recipe_rank(0, 1, argv)


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tiny_assets, tmp_path, capfd):
    import multiprocessing as mp

    model, squad = tiny_assets
    out = tmp_path / "run"
    argv = recipe_overrides(model, squad, out, "--distributed.pp_size=1", "--dataset.limit_dataset_samples=32",
                      "--step_scheduler.max_steps=6", "--dataloader.batch_size=4",
                      "--step_scheduler.global_batch_size=4")
    proc = mp.get_context("fork").Process(target=_crash_while_saving_step_6, args=(argv,))
    proc.start()
    proc.join(240)
    assert proc.exitcode == -signal.SIGKILL
    assert (out / ".tmp-epoch_0_step_6" / "optim").is_dir() and not (out / "epoch_0_step_6").exists()
    crashed = _losses(out)
    assert sorted(crashed) == [1, 2, 3, 4, 5, 6]  # trained to the end, died while saving

    launch_recipe(1, argv)  # the same command: resumes from step 3, the last complete checkpoint
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["event"] == "train"][6:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for r in resumed:
        assert abs(r["loss"] - crashed[r["step"]]) <= 1e-6
    assert not (out / ".tmp-epoch_0_step_6").exists() and (out / "epoch_0_step_6" / "complete.json").is_file()

    # a truncated file of the checkpoint to resume: a clear error naming it, before any step
    shard = next((out / "epoch_0_step_6" / "optim").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(100)
    capfd.readouterr()
    assert run_ranks(run_recipe_rank, 1, argv, timeout=240, start_method="fork") == [2]  # capfd reads its stderr
    err = capfd.readouterr().err
    assert f"{shard} has 100 bytes" in err and "truncated" in err, err[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(records)  # nothing ran
