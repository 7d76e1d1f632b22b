"""Load a YAML config: file, defaults under it, command-line overrides on top, checked."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_pp.config.errors import ConfigError
from nemo_pp.config.keys import to_plain
from nemo_pp.config.overrides import apply_overrides
from nemo_pp.config.targets import targets_differ

__all__ = ["SHIPPED_CONFIGS_RESOLVER", "load_config", "load_yaml", "merge_defaults"]

#: ``${nemo_pp_configs:}``: the folder of the installed package's shipped configs, so a shipped
#: config can name a shipped model config folder (``${nemo_pp_configs:}/models/llama-3.1-70b``)
#: wherever the package is installed
SHIPPED_CONFIGS_RESOLVER = "nemo_pp_configs"


def _shipped_configs_folder() -> str:
    from importlib import resources

    return str(resources.files("nemo_pp.configs"))


if not OmegaConf.has_resolver(SHIPPED_CONFIGS_RESOLVER):
    OmegaConf.register_new_resolver(SHIPPED_CONFIGS_RESOLVER, _shipped_configs_folder)


def load_yaml(config_path: str | os.PathLike) -> DictConfig:
    """Read one YAML file into a DictConfig (interpolations left lazy).

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML (message
            gives file, line and column), or its top level is not a mapping.
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"invalid YAML in {where}:\n{exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not a {type(cfg).__name__}")
    return cfg


def _prune(defaults: dict, user: dict) -> None:
    """Drop from `defaults` (in place) every node the user's node replaces whole.

    Only same-class (or untargeted) mappings survive to be deep-merged: AdamW's `betas`
    must not reach an SGD the user chose instead.
    """
    for key, user_value in user.items():
        if key in defaults:
            if isinstance(defaults[key], dict) and isinstance(user_value, dict) and not targets_differ(defaults[key], user_value):
                _prune(defaults[key], user_value)
            else:
                del defaults[key]


def merge_defaults(defaults: Mapping | DictConfig, cfg: DictConfig) -> DictConfig:
    """Return `defaults` merged under `cfg` (the YAML wins); neither input is modified.

    A defaults node with a `_target_` is replaced whole when `cfg` gives that node with
    a different `_target_` (NeMo AutoModel prefixes count as equal to their nemo_pp
    port); with the same `_target_`, or none on the YAML side, the two deep-merge.
    Keys keep the YAML's order, the defaults' own keys follow.
    """
    plain: Any = to_plain(OmegaConf.create(defaults))  # a fresh copy: the caller's stays as it was
    _prune(plain, to_plain(cfg))
    # After pruning no leaf is in both, so merging the defaults last only sets the order.
    return OmegaConf.merge(cfg, plain)  # type: ignore[return-value]


def check_resolvable(cfg: DictConfig) -> None:
    """Resolve every interpolation once so a bad `${...}` fails now, naming its key.

    Raises:
        ConfigError: an interpolation points nowhere, or an env var without default is unset.
    """
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"cannot resolve config value '{key}': {getattr(exc, 'msg', exc)}") from exc


def load_config(
    config_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    defaults: Mapping | DictConfig | None = None,
) -> DictConfig:
    """Load a config: the YAML file, `defaults` under it, overrides on top (untyped).

    Interpolations such as `${oc.env:NEMO_PP_HOME,${oc.env:HOME}/.cache/nemo_pp}` or
    `${dataloader.batch_size}` stay lazy in the returned config (so later changes
    propagate) but are all resolved once here, so a broken one fails at load time.
    A recipe's typed, validated config: :func:`nemo_pp.planning.schema.load_recipe_config`.

    Args:
        config_path: the YAML file.
        overrides: argv after `--config X` (`--a.b value`, `--a.b=value`) or Hydra
            overrides (`a.b=value`, `+a.b=value`, `++a.b=value`, `~a.b`), e.g. the list
            :func:`parse_cli` returns; see :func:`nemo_pp.config.overrides.apply_overrides`.
            Values are typed by Hydra's grammar (`1e-4` float, `null`, `[1,2]`, `{a: 1}`);
            quote to keep a string.
        defaults: merged UNDER the YAML (see :func:`merge_defaults`), before the overrides.

    Raises:
        ConfigError: missing file; invalid YAML (with file and line); an override of a
            key that exists nowhere (naming the key and the closest existing one),
            unless it is a new kwarg directly under a node with `_target_`; a
            malformed override; an unresolvable interpolation.
    """
    cfg = load_yaml(config_path)
    if defaults:
        cfg = merge_defaults(defaults, cfg)
    apply_overrides(cfg, overrides)
    check_resolvable(cfg)
    return cfg
