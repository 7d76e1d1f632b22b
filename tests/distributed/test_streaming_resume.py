"""Exact resume of a streamed data set (``dataset.streaming: true``): the real recipe on forked
gloo ranks, the tiny tied Llama, SQuAD streamed from the prepared JSONL.

Each case trains 6 steps straight, then 3 steps stopped by SIGTERM and the same command
again; the losses of steps 4-6 must equal the straight run's. The stream is 10 rows long, so
step 3 already reads the second pass (the stream restarts at its end): the checkpoint
holds a position past a wrap. Unpacked, the step-3 checkpoint of pp 2 resumes at pp 2 x dp 2
(the global sample count positions the stream at any dp size); packed, another dp size is
refused with the reason, before any weight is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks
from tests.helpers import launch_recipe, recipe_overrides, run_recipe_rank

pytestmark = pytest.mark.slow  # 7 recipe runs: about 3 minutes on 2 cores

STREAM = ("--dataset.streaming=true", "--dataloader.shuffle=false", "--dataset.limit_dataset_samples=10",
          "--step_scheduler.max_steps=6", "--step_scheduler.global_batch_size=4")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out) if r["event"] == "train"}


def _straight_and_resumed(model, squad, base: Path, world: int, extra: tuple) -> tuple[Path, Path]:
    straight, resumed = base / "straight", base / "resumed"
    launch_recipe(world, recipe_overrides(model, squad, straight, *extra))
    argv = recipe_overrides(model, squad, resumed, *extra)
    launch_recipe(world, argv, sigterm_after_step=3)
    assert max(_losses(resumed)) == 3
    launch_recipe(world, argv)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert abs(_records(straight)[-1]["final_train_loss"] - _records(resumed)[-1]["final_train_loss"]) <= 1e-6
    return straight, resumed


def _step3(out: Path) -> Path:
    return next(out.glob("epoch_*_step_3"))


def test_unpacked_stream_resumes_exactly_and_at_another_dp_size(tiny_assets, tmp_path):
    model, squad = tiny_assets
    extra = (*STREAM, "--dataloader.batch_size=4")
    straight, _ = _straight_and_resumed(model, squad, tmp_path, 2, extra)
    state = json.loads((_step3(straight) / "trainer_state.json").read_text())
    # 12 rows read of a 10-row stream: pass 1, 2 rows in
    assert (state["epoch"], state["samples_in_epoch"]) == (1, 2)
    assert state["data_stream"] == {"dp_size": 1, "packed_sequence_size": 0, "ranks": [{"epoch": 1, "rows": 2}]}
    assert _step3(straight).name == "epoch_1_step_3"

    other = tmp_path / "dp2"
    other.mkdir()
    shutil.copytree(_step3(straight), other / _step3(straight).name)
    launch_recipe(4, recipe_overrides(model, squad, other, *STREAM, "--dataloader.batch_size=2"))  # pp 2 x dp 2
    a, b = _losses(straight), _losses(other)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])  # another reduction order: rounding only


def test_packed_stream_resumes_exactly_and_refuses_another_dp_size(tiny_assets, tmp_path, capfd):
    model, squad = tiny_assets
    extra = (*STREAM, "--dataloader.batch_size=2", "--packed_sequence.packed_sequence_size=64")
    straight, _ = _straight_and_resumed(model, squad, tmp_path, 4, extra)  # pp 2 x dp 2
    state = json.loads((_step3(straight) / "trainer_state.json").read_text())
    # each rank's 5 rows of a pass (32 tokens each) make packs of 2, 2 and 1: 6 packs in 3 steps are 2 passes
    assert state["data_stream"] == {"dp_size": 2, "packed_sequence_size": 64, "ranks": [{"epoch": 1, "rows": 5}] * 2}

    other = tmp_path / "dp1"
    other.mkdir()
    shutil.copytree(_step3(straight), other / _step3(straight).name)
    capfd.readouterr()
    argv = recipe_overrides(model, squad, other, *STREAM, "--dataloader.batch_size=4",
                            "--packed_sequence.packed_sequence_size=64")
    assert run_ranks(run_recipe_rank, 2, argv, timeout=240, start_method="fork") == [2, 2]
    err = capfd.readouterr().err
    assert "packed its stream at distributed.dp_size=2" in err and "resume with distributed.dp_size=2" in err, err[-2000:]
    assert not (other / "metrics.jsonl").exists() or not _losses(other)  # nothing trained
