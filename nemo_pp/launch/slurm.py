"""``nemo-pp finetune --slurm``: check a run against its allocation, write its batch script
into the run's checkpoint_dir and submit it with ``sbatch``.

    nemo-pp finetune --config my.yaml --slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 [--dry-run] [--a.b v ...]

The script (template ``finetune.sbatch`` next to this module) starts one torchrun per node
through one ``srun``; they meet at a c10d rendezvous on the allocation's first node. Slurm
sends the job's step SIGTERM ``signal_seconds`` before the time limit; the recipe saves a
checkpoint at the next step boundary and its main rank writes
``checkpoint_dir/preempted.json`` (:mod:`nemo_pp.training.preemption`); the script then
requeues the job (``scontrol requeue``), and the requeued job, started with the same
config, overrides and checkpoint_dir, resumes from that checkpoint. A run that crashes
leaves no marker and is not requeued.

Everything is checked before anything is written or submitted: ``sbatch`` on the PATH, the
options, ``checkpoint.enabled`` (a requeued job must resume) and the config's layout
against ``nodes * gpus_per_node`` ranks (:func:`nemo_pp.planning.run_plan.plan_run`, from
the model's config alone: no weight or checkpoint is read here; the job checks those).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from nemo_pp.config import write_text_atomic
from nemo_pp.training.preemption import PREEMPTED_MARKER

__all__ = ["SlurmJob", "SlurmOptions", "SubmitError", "find_sbatch", "parse_time_limit", "prepare_job",
           "render_script", "submit", "write_script"]

SCRIPT_NAME = "finetune.sbatch"
MAX_SIGNAL_SECONDS = 65535  # sbatch --signal: sig_time is 16 bits


class SubmitError(RuntimeError):
    """``sbatch`` refused the script (its message is in this error's)."""


@dataclass(frozen=True)
class SlurmOptions:
    """The allocation of ``nemo-pp finetune --slurm``.

    Attributes:
        nodes: nodes of the job (``#SBATCH --nodes``).
        gpus_per_node: ranks per node (torchrun's ``--nproc-per-node``); on CUDA also the
            GPUs requested per node (``--gpus-per-node``), on CPU the cores (``--cpus-per-task``)
            unless ``cpus_per_task`` is given.
        time: the time limit in a format sbatch reads (``MM``, ``MM:SS``, ``HH:MM:SS``,
            ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``); None: the partition's default.
        partition: ``--partition``; None: the cluster's default.
        account: ``--account``; None: the user's default.
        signal_seconds: SIGTERM this many seconds before the time limit (``--signal=TERM@N``).
            However large, the ranks have 30 s from the signal to finish their step and save:
            torchrun kills its workers 30 s after it forwards a signal (torch.distributed.elastic).
        cpus_per_task: ``--cpus-per-task`` of the one task per node (torchrun and its ranks).
        job_name: ``--job-name``; None: ``nemo-pp-<checkpoint_dir's name>``.
    """

    nodes: int
    gpus_per_node: int
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    signal_seconds: int = 120
    cpus_per_task: int | None = None
    job_name: str | None = None

    def check(self) -> None:
        """Check the options against each other.

        Raises:
            ValueError: a count below 1, a signal time outside 1..65535 s or not below the
                time limit, a time limit sbatch would not read (each names the option).
        """
        for name, value in (("nodes", self.nodes), ("gpus-per-node", self.gpus_per_node),
                            ("cpus-per-task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value}: must be at least 1")
        if not 1 <= self.signal_seconds <= MAX_SIGNAL_SECONDS:
            raise ValueError(f"--signal-seconds {self.signal_seconds}: must be 1..{MAX_SIGNAL_SECONDS} "
                             "(seconds before the time limit at which the job gets SIGTERM)")
        if self.time is not None:
            limit = parse_time_limit(self.time)
            if self.signal_seconds >= limit:
                raise ValueError(f"--signal-seconds {self.signal_seconds} is not below --time {self.time} "
                                 f"({limit} s): the job would be signalled at its start; lower it")


@dataclass(frozen=True)
class SlurmJob:
    """A checked batch script, ready to write and submit.

    Attributes:
        script: the batch script's text.
        script_path: where :func:`write_script` puts it (``<checkpoint_dir>/slurm/finetune.sbatch``).
        log_pattern: the job's log, ``%j`` standing for the job id (one file across requeues:
            ``--open-mode=append``).
        checkpoint_dir: the run's folder, absolute: every run of the job resumes from it.
        world_size: ranks of the run (nodes x gpus_per_node).
        device: ``cuda`` or ``cpu``: whether GPUs are requested.
        notes: lines worth printing before submitting (e.g. how ``dist_env.device: auto`` was read).
    """

    script: str
    script_path: Path
    log_pattern: Path
    checkpoint_dir: Path
    world_size: int
    device: str
    notes: list[str] = field(default_factory=list)


def parse_time_limit(value: str) -> int:
    """Seconds of a time limit in sbatch's formats: ``M``, ``M:S``, ``H:M:S``, ``D-H``,
    ``D-H:M``, ``D-H:M:S``.

    Raises:
        ValueError: any other string, or a limit of 0 s (names ``--time``).
    """
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if match is None:
        raise ValueError(f"--time {value}: not a Slurm time limit; use HH:MM:SS, MM, MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    else:  # M or M:S
        seconds = int(a) * 60 + int(b or 0)
    if seconds <= 0:
        raise ValueError(f"--time {value}: the limit must be above 0")
    return seconds


def find_sbatch() -> str:
    """The path of ``sbatch``.

    Raises:
        FileNotFoundError: it is not on the PATH (the message says what to do).
    """
    path = shutil.which("sbatch")
    if path is None:
        raise FileNotFoundError("--slurm: sbatch is not on the PATH; run this on a Slurm login node (or load the "
                                "site's slurm module), or add --dry-run to print the batch script only")
    return path


def _template() -> str:
    return resources.files("nemo_pp.launch").joinpath(SCRIPT_NAME).read_text(encoding="utf-8")


def render_script(*, nodes: int, nproc_per_node: int, device: str, config: str | os.PathLike,
                  overrides: Sequence[str], checkpoint_dir: str | os.PathLike, python: str | None = None,
                  workdir: str | os.PathLike | None = None, options: SlurmOptions | None = None) -> str:
    """The batch script for ``nodes`` x ``nproc_per_node`` ranks of the recipe (pure: checks nothing).

    Args:
        nodes: nodes of the job.
        nproc_per_node: ranks per node.
        device: ``cuda`` (requests ``--gpus-per-node``) or ``cpu`` (``--cpus-per-task``).
        config: the recipe's YAML, absolute: the job may start in another folder.
        overrides: the recipe's override tokens, as on its command line (each is shell-quoted).
        checkpoint_dir: the run's folder, absolute; ``slurm/%j.log`` in it is the job's log.
        python: the interpreter on the nodes; None: this one (a shared file system is assumed).
        workdir: the job's working folder (``--chdir``); None: the current one.
        options: time limit, partition, account, signal time, cpus, job name; None: the defaults.
    """
    opts = options or SlurmOptions(nodes=nodes, gpus_per_node=nproc_per_node)
    ckpt = Path(checkpoint_dir)
    cpus = opts.cpus_per_task or (None if device == "cuda" else nproc_per_node)  # CPU: a core per rank at least
    resources_lines = ([f"#SBATCH --gpus-per-node={nproc_per_node}"] if device == "cuda" else []) + (
        [f"#SBATCH --cpus-per-task={cpus}"] if cpus else [])
    option_lines = [f"#SBATCH --{name}={value}" for name, value in
                    (("time", opts.time), ("partition", opts.partition), ("account", opts.account)) if value]
    values = {
        "job_name": opts.job_name or f"nemo-pp-{ckpt.name}",
        "nodes": str(nodes), "nproc_per_node": str(nproc_per_node),
        "resources": "\n".join(resources_lines), "options": "\n".join(option_lines),
        "signal_seconds": str(opts.signal_seconds),
        "log": str(ckpt / "slurm" / "%j.log"), "workdir": str(Path(workdir or os.getcwd())),
        "checkpoint_dir": shlex.quote(str(ckpt)), "marker": PREEMPTED_MARKER,
        "python": shlex.quote(python or sys.executable), "config": shlex.quote(str(config)),
        "overrides": " ".join(shlex.quote(str(o)) for o in overrides),
    }
    lines = []
    for line in _template().splitlines():
        placeholder = re.fullmatch(r"\{\{(\w+)\}\}", line)
        if placeholder and not values[placeholder.group(1)]:
            continue  # an empty block of #SBATCH lines leaves no blank line
        lines.append(re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def _device(cfg) -> tuple[str, list[str]]:
    device = cfg.dist_env.device
    if device != "auto":
        return device, []
    import torch

    # the nodes' devices cannot be seen from here: read "auto" as this machine's
    device = "cuda" if torch.cuda.is_available() else "cpu"
    how = "requesting --gpus-per-node" if device == "cuda" else \
        "requesting no GPUs (set --dist_env.device cuda to request --gpus-per-node)"
    return device, [f"dist_env.device is auto and this machine {'has' if device == 'cuda' else 'has no'} "
                    f"CUDA device: {how}"]


def prepare_job(config: str | os.PathLike, overrides: Sequence[str], options: SlurmOptions,
                python: str | None = None, workdir: str | os.PathLike | None = None) -> SlurmJob:
    """Check the run and its allocation, and render its batch script (nothing is written).

    Args:
        config: the recipe's YAML path.
        overrides: the recipe's override tokens (``--a.b value`` or ``--a.b=value``).
        options: the allocation; ``nodes * gpus_per_node`` is the run's world size.
        python: the interpreter on the nodes; None: this one.
        workdir: the job's working folder; None: the current one (relative paths of the
            config resolve from there, as they do here).

    Returns:
        The job; its checkpoint_dir is pinned as an absolute override, so every requeued
        run resumes from the same folder.

    Raises:
        ValueError: bad options (:meth:`SlurmOptions.check`); ``checkpoint.enabled`` false
            or ``checkpoint.restore_from`` set (a requeued job must resume from the latest
            checkpoint); a layout that does not fit ``nodes * gpus_per_node`` ranks or that
            the plan refuses (:func:`~nemo_pp.planning.run_plan.plan_run`'s message, after
            the allocation); a checkpoint_dir or working folder with a blank or a ``%``;
            ConfigError (a ValueError) for a config that does not load.
        FileNotFoundError: the config, or the local model folder it names, is missing.
    """
    from nemo_pp.config import parse_cli
    from nemo_pp.planning.run_plan import plan_run
    from nemo_pp.planning.schema import load_recipe_config

    options.check()
    config_path = Path(config).resolve()
    path, parsed = parse_cli(["--config", str(config_path), *overrides])
    cfg = load_recipe_config(path, parsed)
    ck = cfg.checkpoint
    if not ck.enabled:
        raise ValueError("--slurm needs checkpoint.enabled: true: a preempted or requeued job resumes from its "
                         "latest checkpoint, and without checkpoints it would train from step 0 every time; "
                         "add --checkpoint.enabled true")
    if ck.restore_from is not None:
        raise ValueError(f"--slurm: checkpoint.restore_from={ck.restore_from} would restart every requeued run from "
                         "that checkpoint instead of the latest; set --checkpoint.restore_from null (the default: "
                         "the latest complete checkpoint in checkpoint_dir)")
    world = options.nodes * options.gpus_per_node
    try:
        plan_run(cfg, world_size=world, check_checkpoint=False)  # the job checks weights and checkpoints itself
    except ValueError as exc:
        raise ValueError(f"--slurm --nodes {options.nodes} --gpus-per-node {options.gpus_per_node} "
                         f"({world} ranks): {exc}") from exc
    device, notes = _device(cfg)
    ckpt = Path(workdir or os.getcwd(), ck.checkpoint_dir).resolve()
    for name, folder in (("checkpoint.checkpoint_dir", ckpt), ("the working folder", Path(workdir or os.getcwd()))):
        if re.search(r"[\s%]", str(folder)):  # #SBATCH lines split at blanks; % starts sbatch's file patterns
            raise ValueError(f"--slurm: {name} {folder} holds a blank or a %, which #SBATCH --output/--chdir cannot "
                             "carry; choose a folder without them")
    tokens = [*overrides, f"--checkpoint.checkpoint_dir={ckpt}"]
    script = render_script(nodes=options.nodes, nproc_per_node=options.gpus_per_node, device=device,
                           config=config_path, overrides=tokens, checkpoint_dir=ckpt, python=python,
                           workdir=workdir, options=options)
    return SlurmJob(script=script, script_path=ckpt / "slurm" / SCRIPT_NAME, log_pattern=ckpt / "slurm" / "%j.log",
                    checkpoint_dir=ckpt, world_size=world, device=device, notes=notes)


def write_script(job: SlurmJob) -> Path:
    """Write the job's script (atomically: a job submitted from an older copy is not
    affected, sbatch keeps its own) and create its log folder.

    Returns:
        The script's path.

    Raises:
        OSError: checkpoint_dir cannot be written.
    """
    return write_text_atomic(job.script_path, job.script)


def _queued_with(script: Path) -> list[str]:
    """Job ids queued or running from this script (best effort: [] when squeue fails)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return []
    try:
        out = subprocess.run([squeue, "--noheader", "--format=%i %o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1] == str(script)] if out.returncode == 0 else []


def submit(job: SlurmJob, sbatch: str | None = None) -> str:
    """Write the job's script and submit it.

    Args:
        job: from :func:`prepare_job`.
        sbatch: the sbatch program; None: the one on the PATH.

    Returns:
        The job id.

    Raises:
        FileNotFoundError: sbatch is not on the PATH.
        FileExistsError: a job from this checkpoint_dir's script is queued or running (two
            runs would write the same checkpoints).
        SubmitError: sbatch refused the script.
        OSError: the script cannot be written.
    """
    sbatch = sbatch or find_sbatch()
    running = _queued_with(job.script_path)
    if running:
        raise FileExistsError(f"--slurm: job {', '.join(running)} already runs from {job.script_path} (the same "
                              f"checkpoint_dir); wait for it, cancel it (scancel {running[0]}) or choose another "
                              "--checkpoint.checkpoint_dir")
    path = write_script(job)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {path} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: "<id>[;<cluster>]"
