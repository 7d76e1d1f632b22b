"""A user's bad day through the real recipe (``recipes/finetune.py`` ``main`` on forked gloo
ranks, a tiny tied Llama on SQuAD): a diverging run, a full disk, an empty data set.

Each must end with a clear message on every rank and a non-zero exit code, and leave
nothing non-finite or half-written where a later run would trust it.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from nemo_pp.checkpoint import layout
from tests.distributed.launcher import run_ranks
from tests.helpers import recipe_overrides, run_recipe_rank


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model state of a DCP checkpoint folder, as one dict (torch's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "model"), str(target))
    state = torch.load(target, weights_only=True)
    target.unlink()
    return state


def test_a_diverging_run_skips_non_finite_steps_then_stops_with_nothing_non_finite_written(tiny_assets, tmp_path, capfd):
    """A learning rate of 1e30: after step 1 the weights are huge and the gradients NaN. Every
    such step is skipped (weights unchanged), the third in a row stops the run with exit
    code 3 on both ranks; every checkpoint on disk is finite, no export is written."""
    model, squad = tiny_assets
    out = tmp_path / "run"
    argv = recipe_overrides(model, squad, out, "--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=8",
                            "--dataloader.batch_size=2", "--step_scheduler.global_batch_size=2",
                            "--step_scheduler.ckpt_every_steps=1", "--checkpoint.max_recent_checkpoints=2",
                            "--optimizer.lr=1e30", "--lr_scheduler.lr_warmup_steps=0",
                            "--lr_scheduler.lr_decay_style=constant", "--clip_grad_norm.max_norm=null")
    capfd.readouterr()
    assert run_ranks(run_recipe_rank, 2, argv, timeout=240, start_method="fork") == [3, 3]
    err = capfd.readouterr().err
    assert err.count("error: stopped after 3 non-finite steps in a row") == 2, err[-3000:]

    records = _records(out)
    train = [r for r in records if r["event"] == "train"]
    skipped = [r["step"] for r in train if r["skipped"]]
    assert train[0]["skipped"] is False and math.isfinite(train[0]["loss"])
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    bad = next(r for r in train if r["skipped"])
    # the norms (then the gradients) of 1e30-sized weights overflow on both stages
    assert math.isnan(bad["grad_norm"]) and bad["nonfinite"] == {"loss_stages": [], "grad_stages": [0, 1]}
    assert {k: records[-1][k] for k in ("event", "steps", "stopped", "skipped_steps")} == {
        "event": "summary", "steps": skipped[-1], "stopped": "non-finite steps", "skipped_steps": 3}
    assert not (out / "hf_model").exists()

    kept = layout.complete_checkpoints(out)
    assert kept and not list(out.glob(".tmp-*"))
    states = {ref.step: _model_tensors(ref.path) for ref in kept}
    for step, state in states.items():
        assert all(bool(torch.isfinite(t).all()) for t in state.values()), step
    # a skipped step leaves the weights as they were: its checkpoint equals the one before it
    steps = sorted(states)
    if len(steps) == 2 and steps[0] >= skipped[0] - 1:
        for name, t in states[steps[0]].items():
            assert torch.equal(t, states[steps[1]][name]), name


def _mount_tmpfs(path: Path, megabytes: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the injected ENOSPC unit test covers the writer")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a size the test picks (``small_disk(megabytes)``), unmounted afterwards."""
    mounted = []

    def mount(megabytes: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        _mount_tmpfs(path, megabytes)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _disk_argv(model, squad, out, *extra):
    return recipe_overrides(model, squad, out, "--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=4",
                            "--dataloader.batch_size=2", "--step_scheduler.global_batch_size=2",
                            "--step_scheduler.ckpt_every_steps=1", "--checkpoint.max_recent_checkpoints=1", *extra)


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(tiny_assets, small_disk, capfd):
    model, squad = tiny_assets
    out = small_disk(8) / "run"  # one checkpoint of the tiny model (weights + AdamW, two stages) is about 38 MB
    capfd.readouterr()
    assert run_ranks(run_recipe_rank, 2, _disk_argv(model, squad, out), timeout=240, start_method="fork") == [2, 2]
    err = capfd.readouterr().err
    assert err.count(f"checkpoint.checkpoint_dir={out}: its disk has") == 2, err[-3000:]
    assert "Loading weights" not in err and not (out / "metrics.jsonl").exists()


def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(tiny_assets, small_disk, capfd):
    """Room for one checkpoint, not two: the second save fails with the folder and the bytes
    named, exit code 3, the partial folder removed; the first checkpoint is intact, and the
    same command on a disk with room again resumes from it."""
    model, squad = tiny_assets
    disk = small_disk(60)
    out = disk / "run"
    argv = _disk_argv(model, squad, out, "--checkpoint.check_free_space=false")
    capfd.readouterr()
    assert run_ranks(run_recipe_rank, 2, argv, timeout=240, start_method="fork") == [3, 3]
    err = capfd.readouterr().err
    assert err.count("the disk is full") == 2 and "MiB free on that disk" in err, err[-3000:]
    first = out / "epoch_0_step_1"
    assert [r.path for r in layout.complete_checkpoints(out)] == [first], err[-3000:]
    assert f"The last complete checkpoint, {first}, is intact" in err
    assert not list(out.glob(".tmp-*"))  # removed at once: the space is free again

    subprocess.run(["mount", "-o", "remount,size=160m", str(disk)], check=True)  # the user makes room
    capfd.readouterr()
    assert run_ranks(run_recipe_rank, 2, _disk_argv(model, squad, out), timeout=240, start_method="fork") == [0, 0]
    captured = capfd.readouterr()
    assert f"resumed from {first}" in captured.out, captured.out[-3000:]
    assert [r.step for r in layout.complete_checkpoints(out)] == [4] and (out / "hf_model" / "config.json").is_file()


def test_an_empty_data_set_is_named_with_the_problem(tiny_assets, tmp_path, capfd):
    model, squad = tiny_assets
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "validation"):
        (empty / f"{split}.jsonl").write_text("")
    argv = recipe_overrides(model, squad, tmp_path / "run", f"--dataset.path_or_dataset={empty}")
    capfd.readouterr()
    assert run_ranks(run_recipe_rank, 2, argv, timeout=240, start_method="fork") == [2, 2]
    err = capfd.readouterr().err
    assert err.count(f"dataset.path_or_dataset: split 'train' of {empty} has no rows") == 2, err[-3000:]
    assert err.count("] error: dataset: ") == 2
