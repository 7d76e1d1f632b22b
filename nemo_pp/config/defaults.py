"""Merge a recipe's defaults under a user's YAML, respecting `_target_` nodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .keys import to_plain
from .targets import targets_differ

__all__ = ["merge_defaults"]


def _prune(defaults: dict, user: dict) -> None:
    """Drop from `defaults` (in place) every node that the user's node must replace whole.

    What survives is merged by OmegaConf, so only same-class (or untargeted) mappings
    are deep-merged; scalars, lists and differently-typed values are the user's alone.
    """
    for key, user_value in user.items():
        if key not in defaults:
            continue
        default_value = defaults[key]
        if (
            isinstance(default_value, dict)
            and isinstance(user_value, dict)
            and not targets_differ(default_value, user_value)
        ):
            _prune(default_value, user_value)
        else:
            # Keys under a `_target_` are that class's kwargs: AdamW's `betas` must not
            # reach an SGD the user chose instead.
            del defaults[key]


def merge_defaults(defaults: Mapping | DictConfig | None, cfg: DictConfig) -> DictConfig:
    """Return `defaults` merged under `cfg` (the YAML wins); neither input is modified.

    A defaults node with a `_target_` is replaced whole when `cfg` gives that node with
    a different `_target_` (NeMo AutoModel prefixes count as equal to their nemo_pp
    port); with the same `_target_`, or none on the YAML side, the two deep-merge.

    Args:
        defaults: the recipe's defaults, e.g. `{"optimizer": {"_target_": ..., "lr": 1e-5}}`.
        cfg: the loaded YAML.
    """
    if not defaults:
        return cfg
    # A fresh plain copy: pruning must not touch the caller's defaults.
    plain_defaults: Any = OmegaConf.to_container(
        OmegaConf.create(defaults if isinstance(defaults, DictConfig) else dict(defaults)), resolve=False
    )
    _prune(plain_defaults, to_plain(cfg))
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(plain_defaults), cfg), resolve=False)
    # OmegaConf puts the defaults' sections first; keep the user's YAML order on top so
    # the printed config reads like the file, with recipe defaults after it.
    order = [k for k in cfg.keys() if k in merged] + [k for k in merged if k not in cfg]
    return OmegaConf.create({k: merged[k] for k in order})
