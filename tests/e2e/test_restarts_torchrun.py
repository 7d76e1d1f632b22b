"""Restarts and preemption through a real ``torchrun`` (not forked ranks), on the tiny model
(the real SmolLM2 proves nothing more here): a killed worker stops the job and the same
command resumes; ``--max-restarts`` brings the group back by itself; SIGTERM to torchrun
leaves a checkpoint the same command resumes from. Each ends with the final loss of an
uninterrupted run (``straight_loss``: tests/e2e/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers import metric_records as _records
from tests.helpers import quiet_env as _env
from tests.helpers import restart_command as _command


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {path} appeared"
        time.sleep(0.1)


def test_a_killed_worker_stops_the_job_and_the_same_command_resumes(tiny_assets, tmp_path, straight_loss):
    import psutil  # installed with accelerate

    model, squad = tiny_assets
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(model, squad, out), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(out / "epoch_0_step_8" / "complete.json", proc)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, workers
    os.kill(workers[-1].pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun stops the job when a rank dies
    assert max(r["step"] for r in _records(out) if r["event"] == "train") < 24

    again = subprocess.run(_command(model, squad, out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out}/epoch_0_step_" in again.stdout
    final = _records(out)[-1]
    assert final["event"] == "summary" and final["steps"] == 24
    assert abs(final["final_train_loss"] - straight_loss) <= 1e-6, (final["final_train_loss"], straight_loss)


def test_max_restarts_resumes_a_killed_worker_by_itself(tiny_assets, tmp_path, straight_loss):
    """One worker SIGKILLed after the step-8 checkpoint: torchrun restarts the group (its
    store keys were the dead workers' before, see distributed/init.py), the new workers
    resume from the latest checkpoint and the job exits 0 with the uninterrupted loss."""
    import psutil  # installed with accelerate

    model, squad = tiny_assets
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(model, squad, out, "--max-restarts=1"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(out / "epoch_0_step_8" / "complete.json", proc)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, workers
    os.kill(workers[-1].pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    assert f"resumed from {out}/epoch_0_step_" in output
    final = _records(out)[-1]
    assert final["event"] == "summary" and final["steps"] == 24
    assert abs(final["final_train_loss"] - straight_loss) <= 1e-6, (final["final_train_loss"], straight_loss)


def test_sigterm_to_torchrun_checkpoints_then_the_same_command_resumes(tiny_assets, tmp_path, straight_loss):
    """SIGTERM to the torchrun process (what Slurm and Kubernetes send): torchrun forwards
    it, the workers agree at the next step boundary, save and exit 0 (torchrun itself then
    raises its SignalException: exit 1, torch's design); the same command resumes."""
    model, squad = tiny_assets
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(model, squad, out), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").exists() and '"step": 5,' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "stopped by signal after step" in output, output[-4000:]
    summary = _records(out)[-1]
    assert summary["event"] == "summary" and summary["preempted"] is True and summary["steps"] < 24
    assert (out / f"epoch_0_step_{summary['steps']}" / "complete.json").is_file()  # saved where it stopped
    assert "failed (exitcode" not in output  # no worker died: they exited 0 after saving

    again = subprocess.run(_command(model, squad, out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out}/epoch_0_step_{summary['steps']}" in again.stdout
    final = _records(out)[-1]
    assert final["steps"] == 24 and abs(final["final_train_loss"] - straight_loss) <= 1e-6
