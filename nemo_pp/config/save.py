"""Write the effective config: resolved, overrides included."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_pp.config.errors import ConfigError

__all__ = ["config_to_yaml", "save_config", "write_text_atomic"]


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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, flushed to
    disk, then renamed over ``path``: a reader (or a crash) sees the old file or the whole
    new one, never half. Parent folders are created.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written (the temporary file is removed).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def save_config(cfg: DictConfig | Mapping, path: str | os.PathLike) -> Path:
    """Write :func:`config_to_yaml` of `cfg` to `path` atomically, creating parent folders.

    Loading the file back with :func:`load_config` (no overrides) reproduces the run's
    config, because the overrides were applied to `cfg` and env lookups are frozen. The
    text goes to a temporary file in the same folder first, then replaces `path`, so a
    reader never sees half a file.

    Returns:
        The path written.

    Raises:
        ConfigError: an interpolation cannot be resolved (nothing is written).
        OSError: the file cannot be written.
    """
    return write_text_atomic(path, config_to_yaml(cfg))
