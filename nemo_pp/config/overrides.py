"""Command-line overrides in Hydra's grammar, applied to a loaded config.

Hydra's own parser reads them (`a.b=v`, `+a.b=v`, `++a.b=v`, `~a.b`, `~a.b=v`) and
types the values (`1e-4` float, `null`, `true`, `[1,2]`, `{a: 1}`, quoted = string);
NeMo AutoModel's `--a.b v` spelling is rewritten first (:func:`normalize_overrides`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_pp.config.cli import normalize_overrides
from nemo_pp.config.errors import ConfigError
from nemo_pp.config.keys import close_matches, get_dotted_keys, to_plain
from nemo_pp.config.targets import targets_differ

__all__ = ["apply_overrides", "parse_override"]

_parser = functools.cache(OverridesParser.create)


def parse_override(arg: str) -> Override:
    """Parse one Hydra override; errors quote `arg.source` (the text as typed) when present.

    Raises:
        ConfigError: not Hydra override syntax, no key, a package (`a@b=v`) or a sweep
            (`a=1,2`, `range(...)`): a recipe runs one config.
    """
    source = getattr(arg, "source", arg)
    try:
        [ov] = _parser().parse_overrides([str(arg)])
    except HydraException as exc:
        lines = [ln for ln in str(exc).splitlines() if not ln.startswith(("Error parsing override", "See https"))]
        raise ConfigError(
            f"cannot parse override '{source}': " + "\n".join(lines) + "\nExpected '--a.b value', '--a.b=value', "
            "'a.b=value', '+a.b=value' (add), '++a.b=value' (add or set) or '~a.b' (delete), in Hydra's grammar "
            "(https://hydra.cc/docs/advanced/override_grammar/basic/); quote a value with special characters: a.b='~/x'"
        ) from exc
    if not ov.key_or_group or ov.package is not None:
        raise ConfigError(f"cannot parse override '{source}': expected a dotted key such as 'optimizer.lr'")
    if ov.is_sweep_override():
        raise ConfigError(
            f"cannot parse override '{source}': a sweep ('a=1,2', range(), choice()) needs a multirun; "
            "write a list as [a,b] or quote a value that contains a comma"
        )
    return ov


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


def _unknown_key(key: str, source: str, plain: Any, hint: str) -> ConfigError:
    msg = f"unknown config key '{key}' (from override '{source}')"
    close = close_matches(key, get_dotted_keys(plain), n=1)
    return ConfigError(msg + (f"; did you mean '{close[0]}'?" if close else "") + hint)


def _apply_one(cfg: DictConfig, ov: Override, source: str, value_text: str) -> None:
    key, value = ov.key_or_group, ov.value()
    plain = to_plain(cfg)
    exists, current, parent = _lookup(plain, key)
    if ov.is_delete():
        if not exists:
            raise _unknown_key(key, source, plain, "")
        if value is not None and current != value:
            raise ConfigError(f"cannot delete '{key}' (from override '{source}'): its value is {current!r}, not {value!r}")
        parent_node = OmegaConf.select(cfg, key.rsplit(".", 1)[0]) if "." in key else cfg
        last = key.rsplit(".", 1)[-1]
        del parent_node[int(last) if isinstance(parent, list) else last]
        return
    if ov.is_add() and exists and current is not None and not isinstance(value, (dict, list)):
        raise ConfigError(
            f"cannot add '{key}' (from override '{source}'): it already exists. "
            f"Use '{key}={value_text}' to change it (or '++{key}={value_text}' to add or change)."
        )
    if not (exists or ov.is_add() or ov.is_force_add()):
        # A new key directly under a `_target_` node is a kwarg of that callable.
        owner = _lookup(plain, key.rsplit(".", 1)[0])[1] if "." in key else None
        if not (isinstance(owner, dict) and "_target_" in owner):
            raise _unknown_key(key, source, plain, f" Use '+{key}={value_text}' to add a new key.")
    # As for defaults: a mapping naming another `_target_` replaces the node, never merges.
    OmegaConf.update(cfg, key, value, merge=not targets_differ(current, value), force_add=True)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply overrides to `cfg` in place, in order, and return it.

    `overrides` may mix raw argv tokens (`["--a.b", "2", "c=3"]`) and normalised
    strings. Semantics follow Hydra: `a.b=v` changes an existing key (a mapping value
    merges into an existing mapping, unless it names a different `_target_`, which
    replaces the node); `+a.b=v` adds a new key; `++a.b=v` adds or changes; `~a.b`
    deletes (`~a.b=v` only if the value is v). New keys directly under a node with a
    `_target_` are accepted without `+`: they are kwargs of that callable.

    Raises:
        ConfigError: unknown key (naming the closest existing key), unparsable
            override, or a change OmegaConf refuses; the message quotes the override
            as the user typed it.
    """
    for arg in normalize_overrides(overrides):
        ov = parse_override(arg)
        try:
            _apply_one(cfg, ov, arg.source, arg.partition("=")[2])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot apply override '{arg.source}': {exc}") from exc
    return cfg
