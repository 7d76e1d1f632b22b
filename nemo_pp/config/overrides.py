"""Command-line overrides: `--a.b value`, `--a.b=value`, `a.b=value`, `+a.b=value`, `~a.b`.

Values are typed the way the YAML file itself is (OmegaConf's YAML flavour), so
`--optimizer.lr 1e-4` gives the same float as `lr: 1e-4` in the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .keys import closest_key, get_dotted_keys, to_plain
from .targets import targets_differ

__all__ = ["Override", "OverrideArg", "apply_overrides", "group_override_tokens", "parse_override", "parse_value"]


class OverrideArg(str):
    """An override normalised to Hydra form (`a.b=value`) that remembers what the user typed.

    It is a plain `str` everywhere else; `.source` (e.g. `--a.b value`) is only used so
    error messages quote the user's own text.
    """

    source: str

    def __new__(cls, normalized: str, source: str | None = None) -> OverrideArg:
        obj = super().__new__(cls, normalized)
        obj.source = normalized if source is None else source
        return obj


# `+a.b=v`, `++a.b`, `~a.b`: Hydra forms that cannot sensibly be a value (a lone `~`,
# YAML's null, still can).
_PREFIXED_OVERRIDE_RE = re.compile(r"^(?:\+\+?|~)[A-Za-z_]")


def _starts_override(token: str) -> bool:
    return token.startswith("--") or bool(_PREFIXED_OVERRIDE_RE.match(token))


def group_override_tokens(tokens: Sequence[str]) -> list[OverrideArg]:
    """Group raw argv tokens into one normalised override each.

    `--a.b value` (two tokens) and `--a.b=value` become `a.b=value`; a bare `--a.b`
    followed by the end, another `--` token or a `+`/`~` override becomes
    `a.b=true`; `--~a.b` becomes `~a.b`. Hydra-form tokens (`a.b=v`, `+a.b=v`,
    `++a.b=v`, `~a.b`) pass through. A value may start with a single dash
    (`--lr_scale -1`); a value token shaped like `x=y` is taken as the value.

    Raises:
        ConfigError: for a token that is none of these forms.
    """
    out: list[OverrideArg] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, OverrideArg):
            out.append(tok)
        elif tok.startswith("--"):
            body = tok[2:]
            if not body or body.startswith("="):
                raise ConfigError(f"cannot parse override '{tok}': missing key after '--'")
            if "=" in body or body.startswith("~"):
                out.append(OverrideArg(body, tok))
            elif i + 1 < len(tokens) and not _starts_override(tokens[i + 1]):
                out.append(OverrideArg(f"{body}={tokens[i + 1]}", f"{tok} {tokens[i + 1]}"))
                i += 1
            else:
                out.append(OverrideArg(f"{body}=true", tok))
        elif "=" in tok or tok.startswith("~"):
            out.append(OverrideArg(tok))
        else:
            raise ConfigError(
                f"cannot parse override '{tok}': expected '--a.b value', '--a.b=value', "
                "'a.b=value', '+a.b=value' or '~a.b'"
            )
        i += 1
    return out


class _ValueLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 float rule and without timestamps.

    PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; dates would come back
    as datetime objects, which OmegaConf cannot store. OmegaConf patches its own file
    loader the same two ways, so an override types exactly like the same text in a file.
    """


_ValueLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ValueLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Type an override value as YAML would: `false`, `null`, `1e-4`, `[1, 2]`, `{a: 1}`, `up`.

    A quoted value (`'"1e-4"'` on the shell) stays a string, and so does an empty one
    (`a.b=`, as in Hydra). Text that is not valid YAML is kept as a plain string,
    except an unbalanced `[`/`{` value, which is almost certainly a typo.

    Raises:
        ConfigError: for a list or mapping value that does not parse.
    """
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_ValueLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        if text.lstrip().startswith(("[", "{")):
            raise ConfigError(f"cannot parse value {text!r}: {exc}") from exc
        return text


@dataclass(frozen=True)
class Override:
    """One parsed override. `op` is 'set', 'add' (+), 'force_add' (++) or 'delete' (~)."""

    op: str
    key: str
    value: Any
    has_value: bool
    value_text: str
    source: str


_KEY_RE = re.compile(r"^[^.=\s]+(?:\.[^.=\s]+)*$")


def parse_override(arg: str) -> Override:
    """Parse one normalised override string (`a.b=v`, `+a.b=v`, `++a.b=v`, `~a.b[=v]`).

    Raises:
        ConfigError: for a malformed key or a missing `=value`.
    """
    source = getattr(arg, "source", arg)
    if arg.startswith("++"):
        op, rest = "force_add", arg[2:]
    elif arg.startswith("+"):
        op, rest = "add", arg[1:]
    elif arg.startswith("~"):
        op, rest = "delete", arg[1:]
    else:
        op, rest = "set", arg
    key, sep, text = rest.partition("=")
    if not _KEY_RE.match(key):
        raise ConfigError(f"cannot parse override '{source}': bad key {key!r}")
    if not sep and op != "delete":
        raise ConfigError(f"cannot parse override '{source}': expected {key}=VALUE")
    return Override(op, key, parse_value(text) if sep else None, bool(sep), text, source)


def _lookup(plain: Any, key: str) -> tuple[bool, Any, Any]:
    """(exists, value, parent) of a dotted key in a plain container; never resolves."""
    parent, node = None, plain
    for part in key.split("."):
        parent = node
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None, None
    return True, node, parent


def _parent_has_target(plain: Any, key: str) -> bool:
    if "." not in key:
        return False
    exists, parent, _ = _lookup(plain, key.rsplit(".", 1)[0])
    return exists and isinstance(parent, dict) and "_target_" in parent


def _unknown_key(ov: Override, plain: Any) -> ConfigError:
    msg = f"unknown config key '{ov.key}' (from override '{ov.source}')"
    suggestion = closest_key(ov.key, get_dotted_keys(plain))
    if suggestion:
        msg += f"; did you mean '{suggestion}'?"
    if ov.op == "delete":
        return ConfigError(msg)
    return ConfigError(msg + f" Use '+{ov.key}={ov.value_text}' to add a new key.")


def _apply_one(cfg: DictConfig, ov: Override) -> None:
    plain = to_plain(cfg)
    exists, current, parent = _lookup(plain, ov.key)
    if ov.op == "delete":
        if not exists:
            raise _unknown_key(ov, plain)
        if ov.has_value and current != ov.value:
            raise ConfigError(
                f"cannot delete '{ov.key}' (from override '{ov.source}'): its value is {current!r}, not {ov.value!r}"
            )
        parent_node = OmegaConf.select(cfg, ov.key.rsplit(".", 1)[0]) if "." in ov.key else cfg
        last = ov.key.rsplit(".", 1)[-1]
        del parent_node[int(last) if isinstance(parent, list) else last]
        return
    if ov.op == "set" and not exists and not _parent_has_target(plain, ov.key):
        raise _unknown_key(ov, plain)
    if ov.op == "add" and exists and current is not None and not isinstance(ov.value, (dict, list)):
        raise ConfigError(
            f"cannot add '{ov.key}' (from override '{ov.source}'): it already exists. "
            f"Use '{ov.key}={ov.value_text}' to change it (or '++{ov.key}={ov.value_text}' to add or change)."
        )
    # Same rule as the defaults merge: kwargs of one class must not leak into another.
    merge = not targets_differ(current, ov.value)
    OmegaConf.update(cfg, ov.key, ov.value, merge=merge, force_add=True)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply overrides to `cfg` in place, in order, and return it.

    `overrides` may mix raw argv tokens (`["--a.b", "2", "c=3"]`) and normalised
    strings. Semantics follow Hydra: `a.b=v` changes an existing key (a mapping value
    merges into an existing mapping, unless it names a different `_target_`, which
    replaces the node); `+a.b=v` adds a new key; `++a.b=v` adds or changes; `~a.b`
    deletes (`~a.b=v` only if the value is v). New keys directly under a node with a
    `_target_` are accepted without `+`: they are kwargs of that callable.

    Raises:
        ConfigError: unknown key (with the closest existing key as suggestion),
            unparsable override, or a change OmegaConf refuses.
    """
    for arg in group_override_tokens(overrides):
        ov = parse_override(arg)
        try:
            _apply_one(cfg, ov)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot apply override '{ov.source}': {exc}") from exc
    return cfg
