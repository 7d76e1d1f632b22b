"""Split a recipe's argv into the config path and Hydra-syntax overrides."""

from __future__ import annotations

from collections.abc import Sequence

from nemo_pp.config.errors import ConfigError

__all__ = ["USAGE", "OverrideArg", "normalize_overrides", "parse_cli"]

USAGE = "usage: torchrun --nproc_per_node=N recipes/finetune.py --config configs/X.yaml [--a.b value ...]"


class OverrideArg(str):
    """A Hydra override (`a.b=value`) that remembers the text as typed (`.source`, e.g.
    `--a.b value`), so error messages quote the user's own words. A plain str otherwise."""

    source: str

    def __new__(cls, text: str, source: str | None = None) -> OverrideArg:
        obj = super().__new__(cls, text)
        obj.source = text if source is None else source
        return obj


def _starts_override(token: str) -> bool:
    return token.startswith("--") or (token[:1] in "+~" and token.lstrip("+~")[:1].isidentifier())


def normalize_overrides(tokens: Sequence[str]) -> list[OverrideArg]:
    """Rewrite NeMo AutoModel's spelling into Hydra's; Hydra's parser judges the result.

    `--a.b value` (two tokens) and `--a.b=value` become `a.b=value`; a bare `--a.b`
    followed by the end or another override becomes `a.b=true`; `--~a.b` becomes
    `~a.b`. Any other token (`a.b=v`, `+a.b=v`, `++a.b=v`, `~a.b`) passes unchanged.
    A value may start with a single dash (`--lr_scale -1`).
    """
    out: list[OverrideArg] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if isinstance(tok, OverrideArg) or not tok.startswith("--"):
            out.append(tok if isinstance(tok, OverrideArg) else OverrideArg(tok))
        elif "=" in tok or tok.startswith("--~") or tok == "--":
            out.append(OverrideArg(tok[2:], tok))
        elif i < len(tokens) and not _starts_override(tokens[i]):
            out.append(OverrideArg(f"{tok[2:]}={tokens[i]}", f"{tok} {tokens[i]}"))
            i += 1
        else:
            out.append(OverrideArg(f"{tok[2:]}=true", tok))
    return out


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Extract `--config PATH` / `--config=PATH` / `-c PATH`; normalise the other tokens.

    Args:
        argv: the arguments, without the program name (`sys.argv[1:]`).

    Returns:
        `(config_path, overrides)`: one Hydra override string per override (see
        :func:`normalize_overrides`), each an :class:`OverrideArg` keeping `.source`.

    Raises:
        ConfigError: `--config` is missing, has no value or is given twice (the message
            includes the usage line).
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
    return config, list(normalize_overrides(rest))
