"""The ``nemo-pp`` command: run the recipe without a clone, as ``tune run`` (torchtune) and
``automodel`` (NeMo AutoModel) do.

    nemo-pp finetune --config smollm2_135m_squad_pp2 --nproc-per-node 2 [--a.b value ...]
    nemo-pp finetune --config my.yaml --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint host:29500
    nemo-pp finetune --config my.yaml --slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 [--dry-run]
    nemo-pp list                         # the shipped configs
    nemo-pp cp smollm2_135m_squad_pp2 my.yaml
    nemo-pp check-model --config my.yaml # is this model family exact under the pipeline?
    nemo-pp verify outputs/run/hf_model  # a checkpoint or an exported folder against its checksums
    nemo-pp plan --config my.yaml --nodes 8 --gpus-per-node 8 --device H100 [--yaml best.yaml]

``--config`` takes a YAML path, or the name of a shipped config (``nemo_pp/configs``, with
or without ``.yaml``). ``finetune`` execs ``python -m torch.distributed.run`` (torchrun)
with ``-m nemo_pp.recipes.finetune``: every argument it does not know goes to the recipe
as an override. The launcher options are torchrun's own (``--nproc-per-node``,
``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``, ``--rdzv-backend``, ``--master-port``).

``finetune --slurm`` submits the run as a Slurm batch job instead (:mod:`nemo_pp.launch.slurm`):
it checks the layout against ``--nodes`` x ``--gpus-per-node`` ranks and that checkpoints
are on, writes ``<checkpoint_dir>/slurm/finetune.sbatch`` (one torchrun per node through
``srun``) and runs ``sbatch`` on it; the log is ``<checkpoint_dir>/slurm/<job id>.log``.
Slurm's SIGTERM (``--signal-seconds`` before ``--time``, or ``scancel --signal=TERM <job>``)
makes the run save a checkpoint; the script then requeues the job and it resumes there.
``--dry-run`` prints the script and submits nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

LAUNCHER_OPTIONS = ("nproc-per-node", "nnodes", "node-rank", "rdzv-endpoint", "rdzv-backend", "rdzv-id",
                    "master-addr", "master-port", "standalone")


def shipped_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every YAML in the installed ``nemo_pp/configs``."""
    folder = resources.files("nemo_pp.configs")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def resolve_config(value: str) -> Path:
    """A YAML path as given, else the shipped config of that name.

    Raises:
        FileNotFoundError: neither; the shipped names are listed.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    configs = shipped_configs()
    name = value[:-5] if value.endswith(".yaml") else value
    if name in configs:
        return configs[name]
    raise FileNotFoundError(f"--config {value}: no such file, and no shipped config of that name; shipped: "
                            f"{', '.join(sorted(configs))}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-pp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="launch recipes/finetune with torchrun; unknown arguments are overrides")
    ft.add_argument("--config", "-c", required=True, help="a YAML path or a shipped config name (nemo-pp list)")
    for opt in LAUNCHER_OPTIONS:
        if opt == "standalone":
            ft.add_argument(f"--{opt}", action="store_true", help="torchrun's --standalone")
        else:
            ft.add_argument(f"--{opt}", help=f"torchrun's --{opt}")
    slurm = ft.add_argument_group("Slurm (--slurm: submit a batch job instead of running torchrun here)")
    slurm.add_argument("--slurm", action="store_true",
                       help="write <checkpoint_dir>/slurm/finetune.sbatch and submit it with sbatch; a preempted "
                            "job (SIGTERM) saves a checkpoint, requeues itself and resumes")
    slurm.add_argument("--nodes", type=int, help="nodes of the job (with --slurm)")
    slurm.add_argument("--gpus-per-node", type=int,
                       help="ranks per node: GPUs requested per node on CUDA, cores (--cpus-per-task) on CPU")
    slurm.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS (default: the partition's)")
    slurm.add_argument("--partition", help="sbatch --partition (default: the cluster's)")
    slurm.add_argument("--account", help="sbatch --account (default: yours)")
    slurm.add_argument("--signal-seconds", type=int, default=None,
                       help="SIGTERM this many seconds before the time limit, to save a checkpoint (default 120)")
    slurm.add_argument("--cpus-per-task", type=int,
                       help="cores of each node's task (torchrun and its ranks; default: the site's on CUDA, "
                            "--gpus-per-node on CPU)")
    slurm.add_argument("--job-name", help="sbatch --job-name (default: nemo-pp-<checkpoint_dir's name>)")
    slurm.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    sub.add_parser("list", help="the shipped configs")
    check = sub.add_parser("check-model", help="the pipeline parity probe of the config's model family")
    check.add_argument("--config", "-c", required=True, help="a YAML path or a shipped config name")
    verify = sub.add_parser("verify", help="check a checkpoint or an exported folder against its recorded checksums")
    verify.add_argument("folder", help="a checkpoint (epoch_E_step_S) or an exported hf_model / hf_adapter folder")
    plan = sub.add_parser("plan", help="search the parallel layouts of a config; unknown arguments are overrides")
    plan.add_argument("--config", "-c", required=True, help="a YAML path or a shipped config name")
    plan.add_argument("--nodes", type=int, default=1, help="nodes of the cluster (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=None,
                      help="ranks per node (default: 8 for a named GPU, this machine's cores for --device probe)")
    plan.add_argument("--device", default="probe",
                      help="H100, H200, A100, B200, L40S, or probe (this machine's CPU or CUDA device; default)")
    plan.add_argument("--memory-gib", type=float, default=None, help="memory per rank, GiB (default: the device's)")
    plan.add_argument("--peak-tflops", type=float, default=None, help="dense peak per rank (default: the device's)")
    plan.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the config's)")
    plan.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    plan.add_argument("--yaml", default=None, help="write the config with the best layout applied to this file")
    cp = sub.add_parser("cp", help="copy a shipped config to edit it")
    cp.add_argument("name", help="a shipped config name")
    cp.add_argument("dest", help="destination file or folder")
    return parser


def finetune_command(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """The torchrun command line ``nemo-pp finetune`` runs."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    for opt in LAUNCHER_OPTIONS:
        value = getattr(args, opt.replace("-", "_"))
        if value is True:
            cmd.append(f"--{opt}")
        elif value not in (None, False):
            cmd.append(f"--{opt}={value}")
    return cmd + ["-m", "nemo_pp.recipes.finetune", "--config", str(resolve_config(args.config)), *overrides]


def slurm_command(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """``nemo-pp finetune --slurm``: check, write and submit the batch script
    (:mod:`nemo_pp.launch.slurm`); print the job id and its log, or with ``--dry-run`` the
    script only. 0 when submitted (or printed).

    Raises:
        ValueError: a torchrun option given with --slurm, --nodes or --gpus-per-node
            missing, and what :func:`nemo_pp.launch.slurm.prepare_job` refuses.
        FileNotFoundError: sbatch is not on the PATH (checked first, unless --dry-run), the
            config or its local model folder is missing.
        FileExistsError: a job from the same checkpoint_dir is queued or running.
        nemo_pp.launch.slurm.SubmitError: sbatch refused the script.
    """
    from nemo_pp.launch import slurm

    given = [f"--{opt}" for opt in LAUNCHER_OPTIONS if getattr(args, opt.replace("-", "_")) not in (None, False)]
    if given:
        raise ValueError(f"--slurm: {', '.join(given)} are torchrun's options, which the batch script sets; "
                         "use --nodes and --gpus-per-node")
    missing = [name for name in ("nodes", "gpus-per-node") if getattr(args, name.replace("-", "_")) is None]
    if missing:
        raise ValueError(f"--slurm needs {' and '.join('--' + m for m in missing)} (e.g. --nodes 2 --gpus-per-node 8)")
    signal_seconds = slurm.SlurmOptions.signal_seconds if args.signal_seconds is None else args.signal_seconds
    options = slurm.SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                                 partition=args.partition, account=args.account, signal_seconds=signal_seconds,
                                 cpus_per_task=args.cpus_per_task, job_name=args.job_name)
    options.check()
    sbatch = None if args.dry_run else slurm.find_sbatch()  # before the plan: the cheap check first
    job = slurm.prepare_job(resolve_config(args.config), overrides, options)
    for note in job.notes:
        print(f"nemo-pp: {note}", file=sys.stderr)
    if args.dry_run:
        print(job.script, end="")
        return 0
    job_id = slurm.submit(job, sbatch)
    print(f"submitted Slurm job {job_id}: {job.world_size} ranks ({args.nodes} x {args.gpus_per_node}, {job.device}); "
          f"script {job.script_path}; log {str(job.log_pattern).replace('%j', job_id)}", flush=True)
    return 0


def check_model(config: str, overrides: Sequence[str]) -> int:
    """``nemo-pp check-model``: the parity probe (:mod:`nemo_pp.planning.family_probe`) of
    the model the config names, from its config alone (no weight is read); 0 when the
    pipelined forward equals Hugging Face's at 2 and 4 stages, 2 when it does not."""
    from nemo_pp.config import parse_cli
    from nemo_pp.planning.family_probe import PROVEN_MODEL_TYPES, TOLERANCE, probe_model_family
    from nemo_pp.planning.run_plan import build_meta_model
    from nemo_pp.planning.schema import load_recipe_config

    path, parsed = parse_cli(["--config", str(resolve_config(config)), *overrides])  # the recipe's override syntax
    cfg = load_recipe_config(path, parsed)
    model, _ = build_meta_model(cfg, cfg.model.get("pretrained_model_name_or_path"))
    try:
        results = probe_model_family(type(model), model.config)
    except ValueError as exc:
        print(f"nemo-pp check-model: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.model_type} ({type(model).__name__}) at {r.num_stages} stages: max |logits - HF logits| = "
              f"{r.max_relative_diff:.3g} of their scale ({'exact' if r.exact else 'WRONG'}; tolerance {TOLERANCE:g})")
    model_type = results[0].model_type
    proven = model_type in PROVEN_MODEL_TYPES
    print(f"{model_type}: " + ("in the proven family matrix (loss and gradients against Hugging Face at 2 and 4 stages)"
                               if proven else "not in the proven matrix; the recipe runs this probe before training"))
    return 0 if all(r.exact for r in results) else 2


def verify_folder(folder: str) -> int:
    """``nemo-pp verify``: a checkpoint folder against its ``complete.json`` or an exported
    folder against its ``nemo_pp_checksums.json`` (sizes and xxh3-128 digests); 0 when
    every file matches, 2 naming the first that does not."""
    from nemo_pp.checkpoint import layout

    path = Path(folder)
    try:
        if (path / layout.MARKER).is_file():
            layout.verify_manifest(path)
            count = len(json.loads((path / layout.MARKER).read_text())["files"])
        else:
            count = layout.verify_folder_checksums(path)
    except ValueError as exc:  # CorruptCheckpointError
        print(f"nemo-pp verify: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: {count} files match their recorded sizes and checksums")
    return 0


def plan_command(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """``nemo-pp plan``: the layout search (:func:`nemo_pp.planning.search.plan_layouts`);
    prints the best layouts, the command line of the best, and writes it as YAML when asked.
    0 when a layout fits, 2 when none does."""
    import dataclasses

    from nemo_pp.config import parse_cli
    from nemo_pp.planning.devices import GIB, device_spec, probe_device
    from nemo_pp.planning.search import plan_layouts

    config = str(resolve_config(args.config))
    path, parsed = parse_cli(["--config", config, *overrides])
    probing = args.device.lower() == "probe"
    per_node = args.gpus_per_node or (os.cpu_count() or 1 if probing else 8)
    if probing:
        import torch

        device = probe_device("cuda" if torch.cuda.is_available() else "cpu", ranks_per_node=per_node)
    else:
        device = device_spec(args.device)
    if args.memory_gib is not None:
        device = dataclasses.replace(device, memory_bytes=int(args.memory_gib * GIB))
    if args.peak_tflops is not None:
        device = dataclasses.replace(device, peak_tflops=args.peak_tflops)
    print(f"planning {config} for {args.nodes} x {per_node} ranks of {device.name} ({device.source})"
          + ("; timing the model's pieces on this machine first (a minute or two)" if device.cores else ""), flush=True)
    result = plan_layouts(path, parsed, args.nodes, per_node, device, top=args.top, seq_len=args.seq_len)
    print(result.summary())
    best = result.best
    if best is None:
        print("nemo-pp plan: no layout fits in memory; add nodes, shorten the sequence (--seq-len) or lower "
              "step_scheduler.global_batch_size", file=sys.stderr)
        return 2
    print(result.table())
    launch = ["nemo-pp", "finetune", "--config", args.config, f"--nproc-per-node={per_node}"]
    if args.nodes > 1:
        launch += [f"--nnodes={args.nodes}", "--rdzv-endpoint=<first node>:29500"]
    print("\nbest layout, as a command line (" + best.layout.describe() + "):\n  "
          + " ".join(launch + list(overrides) + best.layout.overrides(result.global_batch_size)))
    if args.yaml:
        from omegaconf import OmegaConf

        from nemo_pp.config.cli import normalize_overrides
        from nemo_pp.config.loader import load_yaml
        from nemo_pp.config.overrides import apply_overrides
        from nemo_pp.config.save import write_text_atomic

        raw = load_yaml(config)  # interpolations kept: the file stays the user's, with the layout applied
        tokens = [*overrides, *best.layout.overrides(result.global_batch_size)]
        apply_overrides(raw, ["++" + str(o).lstrip("+") for o in normalize_overrides(tokens)])
        write_text_atomic(args.yaml, f"# nemo-pp plan: {best.layout.describe()}\n" + OmegaConf.to_yaml(raw))
        print(f"wrote {args.yaml}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nemo-pp`` console script: ``finetune``, ``list``, ``cp``, ``check-model``,
    ``verify`` or ``plan``.

    ``finetune`` replaces this process with torchrun (``os.execv``) and does not return;
    ``finetune --slurm`` submits a batch job (:func:`slurm_command`) and returns;
    ``plan`` searches the layouts (:func:`plan_command`).

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0, or 2 (message on stderr) for a config that is not found, a
        ``cp`` destination that exists, a model family whose parity probe fails, a
        folder whose files do not match their checksums, a plan where no layout fits or a
        config or device the plan refuses; for ``--slurm``: sbatch not on the PATH, a layout
        that does not fit the allocation, checkpoints off, a job of the same checkpoint_dir
        already queued, or sbatch's refusal.

    Raises:
        SystemExit: argparse's usage errors, and extra arguments given to ``list`` or ``cp``.
    """
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "finetune" and args.slurm:
            from nemo_pp.launch.slurm import SubmitError

            try:
                return slurm_command(args, rest)
            except SubmitError as exc:  # sbatch refused the job: its message, not a traceback
                print(f"nemo-pp: error: {exc}", file=sys.stderr)
                return 2
        if args.command == "finetune":
            slurm_only = [f"--{name}" for name in ("nodes", "gpus-per-node", "time", "partition", "account",
                                                   "signal-seconds", "cpus-per-task", "job-name", "dry-run")
                          if getattr(args, name.replace("-", "_")) not in (None, False)]
            if slurm_only:
                raise ValueError(f"{', '.join(slurm_only)}: Slurm options; add --slurm to submit a batch job")
            cmd = finetune_command(args, rest)
            print("+ " + " ".join(cmd), flush=True)
            os.execv(cmd[0], cmd)  # torchrun takes over this process (signals, exit code)
        if args.command == "check-model":
            return check_model(args.config, rest)
        if args.command == "plan":
            return plan_command(args, rest)
        if args.command == "verify" and not rest:
            return verify_folder(args.folder)
        if rest:
            raise SystemExit(f"nemo-pp {args.command}: unexpected arguments {rest}")
        if args.command == "list":
            for name, path in sorted(shipped_configs().items()):
                print(f"{name:40s} {path}")
            return 0
        if args.command == "cp":
            src = resolve_config(args.name)
            dest = Path(args.dest)
            if dest.is_dir():
                dest = dest / src.name
            if dest.exists():
                raise FileExistsError(f"{dest} exists; remove it or choose another name")
            shutil.copyfile(src, dest)
            print(f"copied {src.name} to {dest}")
            return 0
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # ConfigError: a ValueError
        print(f"nemo-pp: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
