"""TensorBoard and W&B (offline) sinks of the real recipe, read back; the plot script on its metrics."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT, launch_recipe, recipe_overrides


def test_tensorboard_and_wandb_record_what_metrics_jsonl_records(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, squad = tiny_assets
    out = tmp_path / "run"
    launch_recipe(2, recipe_overrides(model, squad, out, "--dataset.limit_dataset_samples=16", "--step_scheduler.max_steps=3",
                                      "--dataloader.batch_size=4", "--step_scheduler.global_batch_size=4",
                                      "--checkpoint.enabled=false", "--checkpoint.save_consolidated=false",
                                      "+tensorboard={}", "+wandb={project: nemo_pp_test}"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["event"] == "validation"]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [round(v, 5) for v in losses]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("validation/loss")] == [(s, round(v, 5)) for s, v in val]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_gib"} <= set(events.Tags()["scalars"])
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as text

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for needle in (b"train/loss", b"validation/loss", b"nemo_pp_test", b"max_steps"):
        assert needle in log, needle  # history keys, project and config in W&B's run log

    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(out / "metrics.jsonl"),
                           "-o", str(png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
