"""The ``nemo-pp`` command: run the recipe without a clone, as ``tune run`` (torchtune) and
``automodel`` (NeMo AutoModel) do.

    nemo-pp finetune --config smollm2_135m_squad_pp2 --nproc-per-node 2 [--a.b value ...]
    nemo-pp finetune --config my.yaml --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint host:29500
    nemo-pp list                         # the shipped configs
    nemo-pp cp smollm2_135m_squad_pp2 my.yaml

``--config`` takes a YAML path, or the name of a shipped config (``nemo_pp/configs``, with
or without ``.yaml``). ``finetune`` execs ``python -m torch.distributed.run`` (torchrun)
with ``-m nemo_pp.recipes.finetune``: every argument it does not know goes to the recipe
as an override. The launcher options are torchrun's own (``--nproc-per-node``,
``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``, ``--rdzv-backend``, ``--master-port``).
"""

from __future__ import annotations

import argparse
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
    sub.add_parser("list", help="the shipped configs")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nemo-pp`` console script: ``finetune``, ``list`` or ``cp``.

    ``finetune`` replaces this process with torchrun (``os.execv``) and does not return.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0, or 2 (message on stderr) for a config that is not found or a
        ``cp`` destination that exists.

    Raises:
        SystemExit: argparse's usage errors, and extra arguments given to ``list`` or ``cp``.
    """
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "finetune":
            cmd = finetune_command(args, rest)
            print("+ " + " ".join(cmd), flush=True)
            os.execv(cmd[0], cmd)  # torchrun takes over this process (signals, exit code)
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
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"nemo-pp: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
