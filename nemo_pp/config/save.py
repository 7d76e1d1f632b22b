"""Write the effective config: resolved, overrides included."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

__all__ = ["config_to_yaml", "save_config"]


def config_to_yaml(cfg: DictConfig | Mapping) -> str:
    """The config as YAML text with every interpolation resolved (what the run really uses).

    Raises:
        ConfigError: an interpolation cannot be resolved (the key is named).
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve config value '{getattr(exc, 'full_key', '?')}': {exc}") from exc


def save_config(cfg: DictConfig | Mapping, path: str | os.PathLike) -> Path:
    """Write :func:`config_to_yaml` of `cfg` to `path`, creating parent folders.

    Loading the file back with :func:`load_config` (no overrides) reproduces the run's
    config, because the overrides were applied to `cfg` and env lookups are frozen.

    Returns:
        The path written.

    Raises:
        ConfigError: an interpolation cannot be resolved.
        OSError: the file cannot be written.
    """
    text = config_to_yaml(cfg)  # before touching the file: a failed resolve leaves nothing behind
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
