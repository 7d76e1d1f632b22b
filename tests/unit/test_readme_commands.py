"""Every recipe command in the README passes preflight at the world size it launches."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nemo_pp.config import parse_cli
from nemo_pp.planning.run_plan import plan_run
from nemo_pp.planning.schema import load_recipe_config

ROOT = Path(__file__).resolve().parents[2]


def readme_recipe_commands() -> list[str]:
    """Shell commands of the README's code blocks that launch recipes/finetune.py."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "recipes/finetune.py" in line and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def world_size(launcher_args: list[str]) -> int:
    opts = {}
    for i, tok in enumerate(launcher_args):
        if tok.startswith("--") and "=" in tok:
            key, value = tok[2:].split("=", 1)
            opts[key] = value
        elif tok.startswith("--") and i + 1 < len(launcher_args):
            opts[tok[2:]] = launcher_args[i + 1]
    return int(opts.get("nproc_per_node", 1)) * int(opts.get("nnodes", 1))


def test_the_readme_has_recipe_commands():
    assert len(readme_recipe_commands()) >= 4


@pytest.mark.parametrize("command", readme_recipe_commands())
def test_readme_command_passes_preflight(real_assets, command):
    tokens = shlex.split(command.replace("$", ""))
    at = tokens.index("recipes/finetune.py")
    path, overrides = parse_cli(tokens[at + 1:])
    # a checkpoint a command names exists only after a run: check the rest of the command
    overrides = [o for o in overrides if not o.startswith("checkpoint.restore_from=")]
    cfg = load_recipe_config(ROOT / path, overrides)
    plan = plan_run(cfg, world_size(tokens[:at]))
    assert plan.sizes.world_size == world_size(tokens[:at])
