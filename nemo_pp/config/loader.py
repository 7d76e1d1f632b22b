"""Load a YAML config: file, recipe defaults, command-line overrides, checked."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .defaults import merge_defaults
from .errors import ConfigError
from .overrides import apply_overrides

__all__ = ["load_config", "load_yaml"]


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
    """Load a recipe config: YAML file, with defaults under it and overrides on top.

    Interpolations such as `${oc.env:NEMO_PP_HOME,${oc.env:HOME}/.cache/nemo_pp}` or
    `${dataloader.batch_size}` stay lazy in the returned config (so later changes
    propagate) but are all resolved once here, so a broken one fails at load time.

    Args:
        config_path: the YAML file.
        overrides: argv after `--config X`, any mix of `--a.b value`, `--a.b=value`,
            `a.b=value`, `+a.b=value`, `++a.b=value` and `~a.b` (see
            :func:`nemo_pp.config.overrides.apply_overrides`); or the list
            :func:`parse_cli` returns. Values are typed as YAML (`false`, `null`, `1e-4`,
            `[1, 2]`, `{a: 1}`); quote to keep a string.
        defaults: the recipe's defaults for sections the YAML may leave out, merged
            UNDER the YAML (see :func:`nemo_pp.config.defaults.merge_defaults`).

    Returns:
        The merged DictConfig.

    Raises:
        ConfigError: missing file; invalid YAML (with file and line); an override of a
            key that exists in neither the YAML nor the defaults (naming the key and
            the closest existing one), unless it is a new kwarg directly under a node
            with `_target_`; a malformed override; an unresolvable interpolation.
    """
    cfg = merge_defaults(defaults, load_yaml(config_path))
    apply_overrides(cfg, overrides)
    check_resolvable(cfg)
    return cfg
