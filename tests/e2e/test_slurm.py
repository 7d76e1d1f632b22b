"""``nemo-pp finetune --slurm`` on a real one-node Slurm cluster (Debian's slurmctld, slurmd
and munged, started here in a temporary folder): the job is preempted with SIGTERM, saves a
checkpoint, requeues itself and resumes, and ends with the loss of an uninterrupted run.

The cluster: ``scripts/install_slurm.sh`` installs the packages (root with apt-get;
``scripts/run_tests.sh`` calls it). Without them, or without root (slurmd starts each job
step as its user), the test skips, and fails under ``NEMO_PP_REQUIRE_ASSETS=1``.

Which signal reaches torchrun (Slurm 22.05): ``scancel --signal=TERM <job>`` signals the
job's steps, not the batch shell, as ``#SBATCH --signal=TERM@N`` does before the time limit,
so srun's torchrun gets SIGTERM and the script lives on to requeue the job. ``scancel
--full --signal=TERM`` also signals the batch shell and srun: the shell dies, srun kills
the step ("forcing job termination") and the job fails without a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RESTART_CONFIG, ROOT, metric_records, quiet_env, restart_overrides

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):  # daemons: not on a user's PATH
        found = f"/usr/sbin/{name}"
    return found


def _unavailable(msg: str):
    if os.environ.get("NEMO_PP_REQUIRE_ASSETS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``env`` points Slurm's commands at its slurm.conf."""

    env: dict
    folder: Path
    programs: dict

    def run(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """One of Slurm's commands against this cluster."""
        return subprocess.run([self.programs[name], *args], env=self.env, capture_output=True, text=True,
                              timeout=60, check=check)

    def job(self, job_id: str) -> dict:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def logs(self) -> str:
        """The tails of the daemons' logs, for a failure's message."""
        return "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                         for p in sorted((self.folder / "log").glob("*")))


def _conf(folder: Path, host: str) -> str:
    cpus = max(2, os.cpu_count() or 1)  # the job's 2 ranks; config_overrides: believed as configured
    return f"""\
ClusterName=nemopp-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits cred_expire + 1 s before it starts again (default 120 s)
AuthInfo=socket={folder}/munge/munge.socket,cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
# a container: no cgroup plugins
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


def _wait(what: str, ready, seconds: float, cluster: SlurmCluster | None = None, procs=()) -> None:
    deadline = time.time() + seconds
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.time() > deadline:
            logs = cluster.logs() if cluster else ""
            pytest.fail(f"{what}: {'exited: ' + ', '.join(dead) if dead else f'not within {seconds:.0f} s'}\n{logs}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """munged, slurmctld and slurmd in the foreground, on a slurm.conf in a temporary folder
    (free ports, no cgroups); stopped, with every job cancelled first, at teardown."""
    programs = {name: _program(name) for name in PROGRAMS}
    missing = [name for name, path in programs.items() if path is None]
    if missing:
        _unavailable(f"Slurm is not installed ({', '.join(missing)} missing): run scripts/install_slurm.sh as root "
                     "(apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        _unavailable("the Slurm test needs root: slurmd starts each job step as its user")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir()
    for path in (folder, folder / "munge"):
        path.chmod(0o755)  # munged: the socket's folder must be searchable by all
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]  # hostname -s: slurmd finds its NodeName by it
    conf = folder / "slurm.conf"
    conf.write_text(_conf(folder, host))
    cluster = SlurmCluster(env={**os.environ, "SLURM_CONF": str(conf)}, folder=folder, programs=programs)
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        out = open(folder / "log" / f"{name}.out", "w")  # the child keeps its own copy
        procs.append(subprocess.Popen([programs[name], *args], env=cluster.env, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    try:
        start("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={folder}/munge/munge.socket",
              f"--pid-file={folder}/munge/munged.pid", f"--log-file={folder}/log/munged.log",
              f"--seed-file={folder}/munge/munged.seed")
        _wait("munged", (folder / "munge" / "munge.socket").exists, 30, cluster, procs)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf))

        def idle() -> bool:
            state = cluster.run("sinfo", "--noheader", "--format=%T", check=False)
            return state.returncode == 0 and state.stdout.strip() == "idle"

        _wait("the Slurm node idle", idle, 90, cluster, procs)
        yield cluster
    finally:
        if len(procs) == 3:  # the daemons started: cancel the jobs, whose steps outlive slurmd
            jobs = cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
            if jobs:
                cluster.run("scancel", *jobs, check=False)
                deadline = time.time() + 60
                while time.time() < deadline and cluster.run("squeue", "--noheader", check=False).stdout.strip():
                    time.sleep(1)
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.mark.slow
def test_a_preempted_slurm_job_checkpoints_requeues_itself_and_resumes(slurm_cluster, tiny_assets, tmp_path,
                                                                      straight_loss):
    """Submitted by the real CLI (1 node x 2 CPU ranks, the restart run of
    tests/e2e/test_restarts_torchrun.py); ``scancel --signal=TERM`` after step 5 (what
    ``--signal=TERM@N`` sends before the time limit): the ranks save, the batch script
    requeues the job (Restarts=1), the second run resumes from that checkpoint and ends
    with the uninterrupted run's loss."""
    model, squad = tiny_assets
    out = tmp_path / "run"
    env = {**quiet_env(), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    submitted = subprocess.run(
        [sys.executable, "-m", "nemo_pp.cli", "finetune", "--config", RESTART_CONFIG, "--slurm", "--nodes", "1",
         "--gpus-per-node", "2", "--time", "30:00", *restart_overrides(model, squad, out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)
    log = out / "slurm" / f"{job_id}.log"
    assert f"log {log}" in submitted.stdout and (out / "slurm" / "finetune.sbatch").is_file()

    def log_text() -> str:
        return log.read_text(errors="replace") if log.exists() else "(no log)"

    def at_step_5() -> bool:
        if slurm_cluster.job(job_id).get("JobState") in ENDED:
            pytest.fail(f"the job ended before step 5:\n{log_text()[-4000:]}")
        metrics = out / "metrics.jsonl"
        return metrics.exists() and '"step": 5,' in metrics.read_text()

    _wait("step 5 of the Slurm job", at_step_5, 300, slurm_cluster)
    slurm_cluster.run("scancel", "--signal=TERM", job_id)

    def ended() -> bool:
        return slurm_cluster.job(job_id).get("JobState") in ENDED

    _wait(f"the end of job {job_id} (log: {log})", ended, 480, slurm_cluster)
    job, text = slurm_cluster.job(job_id), log_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-6000:])
    assert job["Restarts"] == "1", job  # requeued once, by the batch script
    assert "stopped by signal after step" in text and f"requeueing job {job_id}" in text, text[-6000:]
    assert f"job {job_id} restart 1 on" in text  # SLURM_RESTART_COUNT of the second run
    records = metric_records(out)
    stopped = [r for r in records if r["event"] == "summary" and r.get("preempted")]
    assert len(stopped) == 1 and 5 <= stopped[0]["steps"] < 24, stopped
    assert f"resumed from {out}/epoch_0_step_{stopped[0]['steps']}" in text, text[-6000:]
    final = records[-1]
    assert final["event"] == "summary" and final["steps"] == 24 and not final.get("preempted")
    assert abs(final["final_train_loss"] - straight_loss) <= 1e-6, (final["final_train_loss"], straight_loss)
    assert not (out / "preempted.json").exists()  # the finished run removed the marker
