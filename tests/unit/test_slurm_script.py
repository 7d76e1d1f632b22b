"""``nemo-pp finetune --slurm`` without a cluster: the batch script's directives and its
srun/torchrun line (CUDA and CPU), the refusals before anything is written or submitted
(sbatch not on the PATH, a layout that does not fit the allocation, checkpoints off or a
fixed restore_from, bad times), ``--dry-run``, and the template shipping as package data.
The real submission, preemption and requeue: tests/e2e/test_slurm.py."""

from __future__ import annotations

import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest

from nemo_pp.cli import main
from nemo_pp.launch import slurm
from tests.tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "nemo_pp/configs/smollm2_135m_squad_pp2.yaml"  # pp_size 2


@pytest.fixture(scope="module")
def tiny_overrides(tmp_path_factory) -> list[str]:
    """Overrides of the shipped config onto a tiny Llama's config folder (planning reads no
    weight) and an empty data folder: a global batch of 16 fits 1 x 2 and 2 x 8 ranks."""
    folder = tmp_path_factory.mktemp("tiny_slurm")
    config = tiny_config("llama", layers=8, vocab=256, hidden=64)
    config.max_position_embeddings = 512  # the shipped config's samples are 256 tokens
    config.save_pretrained(folder / "model")
    (folder / "data").mkdir()
    return ["--model.pretrained_model_name_or_path", str(folder / "model"), "--dataset.path_or_dataset",
            str(folder / "data"), "--validation_dataset", "null", "--evaluation", "null",
            "--step_scheduler.global_batch_size", "16", "--dataloader.batch_size", "2", "--checkpoint.enabled", "true"]


def _render(device: str, **options) -> str:
    return slurm.render_script(
        nodes=2, nproc_per_node=8, device=device, config="/abs/my config.yaml", overrides=["--a.b", "x y"],
        checkpoint_dir="/runs/r1", python="/venv/bin/python", workdir="/home/me",
        options=slurm.SlurmOptions(nodes=2, gpus_per_node=8, **options))


def _directives(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_cuda_script_requests_gpus_and_runs_one_torchrun_per_node():
    script = _render("cuda", time="04:00:00", partition="gpu", account="proj")
    assert _directives(script) == [
        "--job-name=nemo-pp-r1", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@120",
        "--requeue", "--output=/runs/r1/slurm/%j.log", "--open-mode=append", "--chdir=/home/me",
        "--time=04:00:00", "--partition=gpu", "--account=proj"]
    launch = script[script.index("\nsrun ") + 1:script.index("status=$?")].replace("\\\n", " ")
    assert " ".join(launch.split()) == (
        'srun --kill-on-bad-exit=0 /venv/bin/python -m torch.distributed.run --nnodes="$SLURM_NNODES" '
        '--nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" '
        "-m nemo_pp.recipes.finetune --config '/abs/my config.yaml' --a.b 'x y'")
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert 'if [ -f "$MARKER" ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert 'MARKER="$CHECKPOINT_DIR/preempted.json"' in script and "CHECKPOINT_DIR=/runs/r1" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # it parses


def test_cpu_script_requests_cores_not_gpus():
    directives = _directives(_render("cpu", signal_seconds=300))
    assert "--cpus-per-task=8" in directives and "--signal=TERM@300" in directives
    assert not any(d.startswith("--gpus") for d in directives)
    assert not any(d.startswith(("--time", "--partition", "--account")) for d in directives)  # none given
    assert "--cpus-per-task=4" in _directives(_render("cpu", cpus_per_task=4))
    assert "--cpus-per-task=16" in _directives(_render("cuda", cpus_per_task=16))


def test_dry_run_prints_the_script_and_writes_nothing(tiny_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch: a dry run does not need it
    out = tmp_path / "run"
    code = main(["finetune", "--config", CONFIG, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                 "--time", "1:00:00", *tiny_overrides, "--dist_env.device", "cuda",
                 "--checkpoint.checkpoint_dir", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.startswith("#!/bin/bash") and "#SBATCH --gpus-per-node=8" in printed.out
    assert f"--config {ROOT / CONFIG}" in printed.out  # absolute: the job may start elsewhere
    assert f"--checkpoint.checkpoint_dir={out}" in printed.out  # pinned: every requeued run resumes there
    assert not out.exists()


def test_cpu_device_requests_a_core_per_rank(tiny_overrides, tmp_path, capsys):
    job = slurm.prepare_job(CONFIG, [*tiny_overrides, "--dist_env.device", "cpu",
                                     f"--checkpoint.checkpoint_dir={tmp_path}"], slurm.SlurmOptions(1, 2))
    assert job.device == "cpu" and job.world_size == 2 and "#SBATCH --cpus-per-task=2" in job.script
    assert job.script_path == tmp_path / "slurm" / "finetune.sbatch" and not job.notes


def test_auto_device_is_read_from_the_submitting_machine(tiny_overrides, tmp_path):
    """Either branch asserts: GPUs requested where CUDA is, else CPU with a note saying how to ask for them."""
    import torch

    auto = slurm.prepare_job(CONFIG, [*tiny_overrides, "--dist_env.device", "auto",
                                      f"--checkpoint.checkpoint_dir={tmp_path}"], slurm.SlurmOptions(1, 2))
    if torch.cuda.is_available():
        assert auto.device == "cuda" and "#SBATCH --gpus-per-node=2" in auto.script
    else:
        assert auto.device == "cpu" and "--dist_env.device cuda" in auto.notes[0]


def test_sbatch_not_on_the_path_is_refused_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("sbatch") is None
    code = main(["finetune", "--config", CONFIG, "--slurm", "--nodes", "1", "--gpus-per-node", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--slurm: sbatch is not on the PATH" in err and "--dry-run" in err


def test_a_layout_that_does_not_fit_the_allocation_is_refused(tiny_overrides, tmp_path, capsys):
    code = main(["finetune", "--config", CONFIG, "--slurm", "--nodes", "1", "--gpus-per-node", "3", "--dry-run",
                 *tiny_overrides, "--checkpoint.checkpoint_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--slurm --nodes 1 --gpus-per-node 3 (3 ranks): " in err and "pp_size" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, named", [
    (["--checkpoint.enabled", "false"], "checkpoint.enabled"),
    (["--checkpoint.restore_from", "/runs/old/epoch_0_step_8"], "checkpoint.restore_from"),
])
def test_a_run_that_could_not_resume_after_a_requeue_is_refused(tiny_overrides, tmp_path, capsys, override, named):
    code = main(["finetune", "--config", CONFIG, "--slurm", "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
                 *tiny_overrides, *override, "--checkpoint.checkpoint_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and f"--{named}" in err, err  # names the key and the fix


def test_a_checkpoint_dir_that_sbatch_lines_cannot_carry_is_refused(tiny_overrides, tmp_path, capsys):
    code = main(["finetune", "--config", CONFIG, "--slurm", "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
                 *tiny_overrides, "--checkpoint.checkpoint_dir", str(tmp_path / "my run")])
    assert code == 2 and "checkpoint.checkpoint_dir" in (err := capsys.readouterr().err) and "a blank or a %" in err


@pytest.mark.parametrize("argv, message", [
    (["--slurm", "--nodes", "1"], "--slurm needs --gpus-per-node"),
    (["--slurm", "--nodes", "1", "--gpus-per-node", "2", "--nproc-per-node", "2"], "torchrun's options"),
    (["--slurm", "--nodes", "0", "--gpus-per-node", "2"], "--nodes 0: must be at least 1"),
    (["--slurm", "--nodes", "1", "--gpus-per-node", "2", "--time", "1h"], "--time 1h: not a Slurm time limit"),
    (["--slurm", "--nodes", "1", "--gpus-per-node", "2", "--time", "2"], "--signal-seconds 120 is not below --time 2"),
    (["--nodes", "2"], "--nodes: Slurm options; add --slurm"),
])
def test_bad_options_are_refused_naming_the_option(argv, message, capsys):
    assert main(["finetune", "--config", CONFIG, *argv]) == 2
    assert message in capsys.readouterr().err


def test_time_limits_in_sbatch_formats():
    assert [slurm.parse_time_limit(t) for t in ("30", "30:15", "04:00:00", "1-12", "1-12:30", "2-00:00:10")] == [
        1800, 1815, 14400, 129600, 131400, 172810]


def test_submit_writes_the_script_into_the_run_and_prints_the_job_id(tiny_overrides, tmp_path, capsys, monkeypatch):
    """Through a stand-in sbatch that records its argument (the real one: tests/e2e/test_slurm.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(slurm, "_queued_with", lambda script: [])  # no squeue of a real cluster
    out = tmp_path / "run"
    code = main(["finetune", "--config", CONFIG, "--slurm", "--nodes", "1", "--gpus-per-node", "2", *tiny_overrides,
                 "--dist_env.device", "cpu", "--checkpoint.checkpoint_dir", str(out)])
    printed = capsys.readouterr().out
    script = out / "slurm" / "finetune.sbatch"
    assert code == 0 and "submitted Slurm job 4242" in printed and f"log {out}/slurm/4242.log" in printed
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(script)]
    assert script.read_text().startswith("#!/bin/bash") and not list(script.parent.glob(".*.tmp"))


def test_the_template_ships_in_the_wheel():
    """pyproject's package-data for nemo_pp.launch matches the template (setuptools
    leaves out of a wheel any file no pattern names)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch(slurm.SCRIPT_NAME, pattern) for pattern in package_data["nemo_pp.launch"])
    assert (ROOT / "nemo_pp" / "launch" / slurm.SCRIPT_NAME).is_file()
