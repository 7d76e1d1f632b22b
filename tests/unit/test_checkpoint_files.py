"""Checkpoint folders on disk: naming, the completion marker, retention, restore_from,
and the checks that refuse truncated, unsafe or foreign checkpoints before any load."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from nemo_pp.checkpoint import layout
from nemo_pp.checkpoint.checkpointer import Checkpointer, check_checkpoint
from nemo_pp.checkpoint.layout import CorruptCheckpointError
from nemo_pp.training.lr_scheduler import build_lr_scheduler
from tests.tiny_models import tiny_model


def _fake_checkpoint(root, epoch, step, complete=True):
    name = layout.checkpoint_name(epoch, step)
    temp = layout.temp_dir_for(root, name)
    (temp / "model").mkdir(parents=True)
    (temp / "model" / "data").write_bytes(b"x" * 100)
    if not complete:
        return temp
    return layout.mark_complete(temp, root / name)


def test_complete_checkpoints_ordered_by_step_and_incomplete_ones_ignored(tmp_path):
    _fake_checkpoint(tmp_path, 0, 10)
    _fake_checkpoint(tmp_path, 1, 30)
    _fake_checkpoint(tmp_path, 0, 20)
    _fake_checkpoint(tmp_path, 1, 40, complete=False)  # a save killed before its rename
    (tmp_path / "epoch_1_step_50").mkdir()  # renamed, but the marker never written
    refs = layout.complete_checkpoints(tmp_path)
    assert [r.step for r in refs] == [10, 20, 30]
    assert layout.resolve_restore_from(tmp_path, None) == tmp_path / "epoch_1_step_30"
    assert layout.resolve_restore_from(tmp_path, "LATEST") == tmp_path / "epoch_1_step_30"
    assert layout.resolve_restore_from(tmp_path, "epoch_0_step_10") == tmp_path / "epoch_0_step_10"
    assert layout.resolve_restore_from(tmp_path, str(tmp_path / "epoch_0_step_20")) == tmp_path / "epoch_0_step_20"
    with pytest.raises(CorruptCheckpointError, match="not a complete checkpoint"):
        layout.resolve_restore_from(tmp_path, "epoch_1_step_50")
    with pytest.raises(CorruptCheckpointError, match="no such checkpoint"):
        layout.resolve_restore_from(tmp_path, "epoch_9_step_9")

    removed = {p.name for p in layout.remove_incomplete(tmp_path)}
    assert removed == {".tmp-epoch_1_step_40", "epoch_1_step_50"}
    assert [r.step for r in layout.complete_checkpoints(tmp_path)] == [10, 20, 30]


def test_fresh_start_and_latest_without_checkpoints(tmp_path):
    assert layout.resolve_restore_from(tmp_path / "missing", None) is None
    with pytest.raises(CorruptCheckpointError, match="restore_from=LATEST"):
        layout.resolve_restore_from(tmp_path, "LATEST")


def test_prune_keeps_the_newest_and_removes_the_marker_first(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, 0, step)
    removed = layout.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["epoch_0_step_1", "epoch_0_step_2"]
    assert [r.step for r in layout.complete_checkpoints(tmp_path)] == [3, 4]
    assert layout.prune_checkpoints(tmp_path, keep=None) == []
    assert layout.prune_checkpoints(tmp_path, keep=1, protect=tmp_path / "epoch_0_step_3") == []


def test_marker_lists_every_file_and_a_new_save_of_the_same_step_replaces_the_old(tmp_path):
    final = _fake_checkpoint(tmp_path, 0, 5)
    manifest = json.loads((final / layout.MARKER).read_text())
    assert manifest == {"files": {"model/data": 100}, "checksums": {
        "algorithm": "xxh3_128", "files": {"model/data": layout.file_checksum(final / "model" / "data")}}}
    (final / "stale").write_text("from the first run")
    temp = _fake_checkpoint(tmp_path, 0, 5, complete=False)  # restored from an older checkpoint, step 5 again
    assert layout.mark_complete(temp, final) == final
    assert not (final / "stale").exists() and not temp.exists()
    layout.verify_manifest(final)


def test_truncated_or_missing_file_is_named(tmp_path):
    final = _fake_checkpoint(tmp_path, 0, 5)
    with open(final / "model" / "data", "r+b") as f:
        f.truncate(60)
    with pytest.raises(CorruptCheckpointError, match=r"model/data has 60 bytes.*says 100"):
        layout.verify_manifest(final)
    (final / "model" / "data").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"model/data is missing"):
        layout.verify_manifest(final)


# ---------------------------------------------------------------- real DCP checkpoints, one process
def _trained(layers=2, optimizer=torch.optim.AdamW):
    model = tiny_model("llama", tied=True, layers=layers)
    opt = optimizer(model.parameters(), lr=1e-2)
    sched = build_lr_scheduler(opt, total_steps=10, lr_warmup_steps=2)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(tmp_path, model, opt, sched, fmt="torch_save"):
    ck = Checkpointer(tmp_path, [model], [opt], [sched], model_save_format=fmt,
                      tied=("model.embed_tokens.weight", "lm_head.weight"))
    with pytest.warns(UserWarning, match="single process"):  # DCP without a process group
        return ck.save(0, 1, {"step": 1, "epoch": 0, "samples_in_epoch": 4}, "seed: 1\n")


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_save_then_load_restores_model_optimizer_and_lr(tmp_path, fmt):
    model, opt, sched = _trained()
    path = _save(tmp_path, model, opt, sched, fmt)
    state = check_checkpoint(path, _shapes(model))
    assert state["step"] == 1 and state["model_save_format"] == fmt
    assert (path / "config.yaml").read_text() == "seed: 1\n"

    fresh, fopt, fsched = _trained()  # same init seed, but its own batch: different weights
    fresh.model.layers[0].mlp.up_proj.weight.data.add_(1.0)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = build_lr_scheduler(fresh_opt, total_steps=10, lr_warmup_steps=2)
    with pytest.warns(UserWarning, match="single process"):
        Checkpointer(tmp_path, [fresh], [fresh_opt], [fresh_sched], model_save_format=fmt).load(path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for pid in sa:
        for key in sa[pid]:
            torch.testing.assert_close(sb[pid][key], sa[pid][key], rtol=0, atol=0)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    assert fresh_sched.last_epoch == sched.last_epoch == 1


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    model, opt, sched = _trained()
    path = _save(tmp_path, model, opt, sched)
    shard = next((path / "optim").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name} has .* bytes.*truncated"):
        check_checkpoint(path, _shapes(model))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt, sched = _trained(layers=2)
    path = _save(tmp_path, model, opt, sched)
    bigger = tiny_model("llama", tied=True, layers=3)
    with pytest.raises(CorruptCheckpointError, match=r"another model: .*not in it \(e.g. model.layers.2"):
        check_checkpoint(path, _shapes(bigger))
    wider = tiny_model("llama", tied=True, layers=2, hidden=64)
    with pytest.raises(CorruptCheckpointError, match=r"shapes differ"):
        check_checkpoint(path, _shapes(wider))


def test_optimizer_of_another_kind_is_refused(tmp_path):
    model, opt, sched = _trained()
    path = _save(tmp_path, model, opt, sched)
    sgd_model, sgd, sgd_sched = _trained(optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    with pytest.raises(CorruptCheckpointError, match=r"lacks .* entries of this optimizer.*momentum_buffer"):
        Checkpointer(tmp_path, [sgd_model], [sgd], [sgd_sched]).load(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_index_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    path = _save(tmp_path, model, opt, sched)
    monkeypatch.chdir(tmp_path)
    index = path / "model" / ".metadata"
    index.write_bytes(pickle.dumps(_Payload()))
    manifest = json.loads((path / layout.MARKER).read_text())
    manifest["files"]["model/.metadata"] = index.stat().st_size  # a consistent but hostile checkpoint
    manifest["checksums"]["files"]["model/.metadata"] = layout.file_checksum(index)
    (path / layout.MARKER).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=r"unreadable or unsafe .*posix.system|unsafe .*os.system"):
        check_checkpoint(path, _shapes(model))
    assert not (tmp_path / "PWNED").exists()


def _flip_one_byte(path):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_flipped_byte_is_refused_naming_the_file_unless_the_check_is_off(tmp_path):
    model, opt, sched = _trained()
    path = _save(tmp_path, model, opt, sched)
    shard = next((path / "model").glob("*.distcp"))
    size = shard.stat().st_size
    _flip_one_byte(shard)
    assert shard.stat().st_size == size  # the size check alone would pass
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name} does not match its checksum.*verify_checksums=false"):
        check_checkpoint(path, _shapes(model))
    check_checkpoint(path, _shapes(model), checksums=False)


def test_a_marker_without_checksums_is_checked_by_size(tmp_path):
    final = _fake_checkpoint(tmp_path, 0, 5)
    (final / layout.MARKER).write_text(json.dumps({"files": {"model/data": 100}}))  # written before checksums
    layout.verify_manifest(final)


def test_a_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    from nemo_pp.checkpoint.checkpointer import CheckpointWriteError

    model, opt, sched = _trained()
    previous = _save(tmp_path, model, opt, sched)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    ck = Checkpointer(tmp_path, [model], [opt], [sched], max_recent_checkpoints=1)
    with pytest.warns(UserWarning, match="single process"), pytest.raises(CheckpointWriteError) as info:
        ck.save(0, 2, {"step": 2, "epoch": 0, "samples_in_epoch": 8}, "seed: 1\n")
    message = str(info.value)
    assert "the disk is full" in message and str(tmp_path / ".tmp-epoch_0_step_2") in message
    assert f"The last complete checkpoint, {previous}, is intact" in message and "MiB free" in message
    assert [r.path for r in layout.complete_checkpoints(tmp_path)] == [previous]  # not rotated away
    check_checkpoint(previous, _shapes(model))
    Checkpointer(tmp_path, [model], [opt], [sched]).remove_incomplete()  # what the next run does first
    assert not (tmp_path / ".tmp-epoch_0_step_2").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    from nemo_pp.checkpoint.finite import NonFiniteWeightsError

    model, opt, sched = _trained()
    previous = _save(tmp_path, model, opt, sched)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    ck = Checkpointer(tmp_path, [model], [opt], [sched], max_recent_checkpoints=1)
    with pytest.raises(NonFiniteWeightsError, match=r"model.layers.1.mlp.down_proj.weight.*kept as they are"):
        ck.save(0, 2, {"step": 2, "epoch": 0, "samples_in_epoch": 8}, "seed: 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name]


def test_an_exported_folder_carries_checksums_that_nemo_pp_verify_checks(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from nemo_pp.checkpoint.hf_export import save_consolidated_hf
    from nemo_pp.cli import main

    model = tiny_model("llama", tied=True, layers=2)
    out = save_consolidated_hf(tmp_path / "hf_model", [model], model.config, None, tied=True,
                               tied_head_fqn="lm_head.weight", pp_rank=0, pp_size=1)
    assert (out / layout.EXPORT_CHECKSUMS).is_file()
    AutoModelForCausalLM.from_pretrained(out)  # the extra file is ignored by transformers
    assert main(["verify", str(out)]) == 0 and "files match" in capsys.readouterr().out
    _flip_one_byte(out / "model.safetensors")
    assert main(["verify", str(out)]) == 2
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err
