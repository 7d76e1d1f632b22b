"""`_target_` instantiation: Hydra's instantiate behind nemo_pp's target policy."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from nemo_pp.config.errors import ConfigError
from nemo_pp.config.targets import check_target, iter_targets, node_key, rewrite_target, target_key, target_name

__all__ = ["instantiate"]

_FULL_KEY_RE = re.compile(r"\nfull_key: (\S+)\s*$")


def _prepared_copy(node: DictConfig | ListConfig) -> DictConfig | ListConfig:
    """A resolved deep copy of `node` (still attached to its parent) with NeMo targets rewritten.

    Resolving first means a `_target_` reached through an interpolation is rewritten
    in our copy, never in the node it points to.
    """
    prepared = copy.deepcopy(node)  # OmegaConf keeps the parent link, so full keys stay right
    with read_write(prepared), open_dict(prepared):
        OmegaConf.resolve(prepared)
        for _, mapping in iter_targets(prepared):
            if isinstance(mapping["_target_"], str):
                mapping["_target_"] = rewrite_target(mapping["_target_"])
    return prepared


def _rewritten_plain(value: Any) -> Any:
    """Shallow-rebuilt plain containers with NeMo targets rewritten; other leaves untouched.

    Kwargs may hold tensors or generators (`params=model.parameters()`), which must be
    passed on as they are, never copied or iterated.
    """
    if isinstance(value, Mapping) and not isinstance(value, DictConfig):
        out = {k: _rewritten_plain(v) for k, v in value.items()}
        if isinstance(out.get("_target_"), str):
            out["_target_"] = rewrite_target(out["_target_"])
        return out
    if isinstance(value, list):
        return [_rewritten_plain(v) for v in value]
    if isinstance(value, (DictConfig, ListConfig)):
        return _prepared_copy(value)
    return value


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a config node describes (Hydra's `instantiate`, policed).

    Nested `_target_` nodes are built too (`_recursive_`) and containers reach the
    callable as plain dicts/lists (`_convert_="all"`), unless the node sets these keys.
    Before anything is called, every `_target_` in the node and in `kwargs` is
    rewritten from NeMo AutoModel's prefix to nemo_pp's, checked against the allowlist
    and imported (see :func:`validate_targets`). The node itself is not modified.

    Args:
        node: a DictConfig / ListConfig node (ideally a node of the loaded config, so
            messages name its key), or a plain dict.
        *args: positional arguments for the top-level target.
        **kwargs: keyword arguments for the top-level target; they win over the
            node's keys, e.g. `instantiate(cfg.optimizer, params=model.parameters())`.

    Raises:
        ConfigError: a target is not allowlisted or not importable (nothing was
            called); an interpolation does not resolve; or the target's call raised
            TypeError/ValueError (typically a wrong kwarg), chained, with message
            "while instantiating 'optimizer' (torch.optim.AdamW): TypeError: ...".
        Exception: any other exception from the target's own call propagates with its
            own type (so callers can still catch OSError etc.), with a note naming the
            config key.
    """
    if not isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.create(node)
    base = node_key(node)
    try:
        prepared = _prepared_copy(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"while instantiating '{base or '<config root>'}': cannot resolve config: {exc}") from exc
    kwargs = {k: _rewritten_plain(v) for k, v in kwargs.items()}

    targets: dict[str, str] = {}
    # Hydra names a failing node by OmegaConf's `_get_full_key(None)`, which renders
    # list items oddly (`model._args_0`); map those back to our `model._args_[0]`.
    hydra_keys: dict[str, str] = {}
    for path, mapping in iter_targets(prepared, base):
        check_target(mapping["_target_"], target_key(path))
        targets[path] = target_name(mapping["_target_"])
        hydra_keys[node_key(mapping)] = path
    for name, value in kwargs.items():
        for path, mapping in iter_targets(value, f"{base}.{name}" if base else name):
            check_target(mapping["_target_"], target_key(path))

    if isinstance(prepared, DictConfig) and "_convert_" not in prepared:
        kwargs.setdefault("_convert_", "all")
    try:
        return hydra.utils.instantiate(prepared, *args, **kwargs)
    except InstantiationException as exc:
        # Hydra reports the failing node's key only inside its message text.
        match = _FULL_KEY_RE.search(str(exc))
        key = hydra_keys.get(match.group(1), match.group(1)) if match else base
        where = f"'{key or '<config root>'}'" + (f" ({targets[key]})" if key in targets else "")
        cause = exc.__cause__
        if isinstance(cause, (TypeError, ValueError)):
            raise ConfigError(f"while instantiating {where}: {type(cause).__name__}: {cause}") from cause
        if cause is not None:
            if hasattr(cause, "add_note"):
                cause.add_note(f"(raised while instantiating {where})")
            raise cause from None
        raise ConfigError(f"while instantiating {where}: {exc}") from exc
