"""Split a recipe's argv into the config path and its overrides."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError
from .overrides import group_override_tokens

__all__ = ["USAGE", "parse_cli"]

USAGE = "usage: torchrun --nproc_per_node=N recipes/finetune.py --config configs/X.yaml [--a.b value ...]"


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Extract `--config PATH` / `--config=PATH` / `-c PATH` and group the other tokens.

    Args:
        argv: the arguments, without the program name (`sys.argv[1:]`).

    Returns:
        `(config_path, overrides)`: each override is one Hydra-form string
        (`a.b=value`, `+a.b=value`, `~a.b`), an `OverrideArg` (a str) whose `.source`
        keeps the text as typed (`--a.b value`) for error messages. A bare `--flag`
        followed by another `--` token or the end means `flag=true`.

    Raises:
        ConfigError: `--config` is missing, has no value or is given twice (message
            includes the usage line), or a token is not an override.
    """
    config: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--config", "-c"):
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise ConfigError(f"{tok} needs a path\n{USAGE}")
            value, i = argv[i + 1], i + 2
        elif tok.startswith("--config="):
            value, i = tok[len("--config=") :], i + 1
            if not value:
                raise ConfigError(f"--config needs a path\n{USAGE}")
        else:
            rest.append(tok)
            i += 1
            continue
        if config is not None:
            raise ConfigError(f"--config given twice ({config!r} and {value!r})\n{USAGE}")
        config = value
    if config is None:
        raise ConfigError(f"missing --config\n{USAGE}")
    overrides: list[str] = list(group_override_tokens(rest))
    return config, overrides
