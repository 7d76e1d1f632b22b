"""`_target_` policy: NeMo AutoModel prefix rewriting, allowlist, import checks.

Everything here inspects targets without calling them, so a whole config can be
vetted before any expensive or unsafe work starts.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_pp.config.errors import ConfigError
from nemo_pp.config.keys import close_matches

__all__ = [
    "ALLOWLIST_ENV_VAR",
    "DEFAULT_ALLOWED_PREFIXES",
    "allowed_prefixes",
    "check_target",
    "iter_targets",
    "node_key",
    "rewrite_target",
    "target_key",
    "targets_differ",
    "validate_targets",
]

logger = logging.getLogger(__name__)

ALLOWLIST_ENV_VAR = "NEMO_PP_TARGET_ALLOWLIST"
DEFAULT_ALLOWED_PREFIXES = ("nemo_pp", "torch", "transformers", "datasets", "math", "functools")

# Longest first: `nemo_automodel.components.x` must not become `nemo_pp.components.x`.
_NEMO_PREFIXES = ("nemo_automodel.components.", "nemo_automodel.")
_logged_rewrites: set[str] = set()


def rewrite_target(target: str) -> str:
    """Map a NeMo AutoModel target onto nemo_pp (`nemo_automodel.components.` -> `nemo_pp.`).

    This is the porting rule for NeMo AutoModel YAMLs, applied automatically so an
    unported YAML works too. Each rewritten target is logged once per process at INFO.
    Other targets are returned unchanged.
    """
    for prefix in _NEMO_PREFIXES:
        if target.startswith(prefix):
            new = "nemo_pp." + target[len(prefix) :]
            if target not in _logged_rewrites:
                _logged_rewrites.add(target)
                logger.info("_target_ %r rewritten to %r (NeMo AutoModel compatibility)", target, new)
            return new
    return target


def allowed_prefixes() -> tuple[str, ...]:
    """The module prefixes `_target_` may use: the defaults plus $NEMO_PP_TARGET_ALLOWLIST.

    The environment variable is comma-separated, e.g. `mypkg,other.models`.
    """
    extra = os.environ.get(ALLOWLIST_ENV_VAR, "")
    return DEFAULT_ALLOWED_PREFIXES + tuple(p.strip().rstrip(".") for p in extra.split(",") if p.strip())


def _is_allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    # Match whole dotted components so that allowing `torch` does not allow `torchevil`.
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _suggest_attr(obj: Any, name: str, owner: str) -> str:
    names = [n for n in dir(obj) if not n.startswith("_")]
    close = [f"'{owner}.{c}'" for c in close_matches(name, names, n=3)]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]
    return f"; did you mean {listed}?"


class _TargetImportError(Exception):
    """Internal: why a target could not be located (message already user-facing)."""


def _locate(target: str) -> Any:
    """Import the object named by a dotted path without calling it.

    Walks the path as Hydra's locator does: import the first component, then for each
    next one take the attribute, or import it as a submodule when the current object
    is a module that has not imported it yet. So
    `transformers.AutoModelForCausalLM.from_pretrained` is module `transformers`,
    attribute chain `AutoModelForCausalLM.from_pretrained`. Our own walk (rather than
    Hydra's `_locate`) knows where the lookup failed, which the suggestion needs.
    """
    parts = target.split(".")
    if not target or any(not p for p in parts):
        raise _TargetImportError("not a dotted path like 'package.module.Name'")
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError as exc:
        raise _TargetImportError(f"{type(exc).__name__}: {exc}") from exc
    path = parts[0]
    for part in parts[1:]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not isinstance(obj, ModuleType):
                raise _TargetImportError(
                    f"'{path}' has no attribute '{part}'" + _suggest_attr(obj, part, path)
                ) from None
            try:
                obj = importlib.import_module(f"{path}.{part}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{path}.{part}":
                    # The submodule exists but one of its own imports is missing.
                    raise _TargetImportError(f"{type(exc).__name__}: {exc}") from exc
                raise _TargetImportError(
                    f"module '{path}' has no attribute '{part}'" + _suggest_attr(obj, part, path)
                ) from None
            except ImportError as exc:
                raise _TargetImportError(f"{type(exc).__name__}: {exc}") from exc
        except ImportError as exc:
            # Lazy modules (transformers) import on attribute access and can fail there.
            raise _TargetImportError(f"{type(exc).__name__}: {exc}") from exc
        path = f"{path}.{part}"
    return obj


def node_target_object(node: Any) -> Any:
    """The object config node ``node``'s ``_target_`` names (NeMo AutoModel's spellings
    rewritten), imported without calling it; None when there is no node, no string target, or
    it cannot be imported (``validate_targets`` reports that, with its suggestion)."""
    target = node.get("_target_") if node is not None and hasattr(node, "get") else None
    if not isinstance(target, str):
        return None
    try:
        return _locate(rewrite_target(target))
    except Exception:  # reported by validate_targets, not here
        return None


def targets_differ(old: Any, new: Any) -> bool:
    """True when both are `_target_` mappings naming different callables (after NeMo rewriting)."""
    if not (isinstance(old, dict) and isinstance(new, dict) and "_target_" in old and "_target_" in new):
        return False
    a, b = old["_target_"], new["_target_"]
    if isinstance(a, str) and isinstance(b, str):
        return rewrite_target(a) != rewrite_target(b)
    return a != b


def target_name(target: Any) -> str:
    """The dotted name of a `_target_` value: the string itself, or `module.qualname`."""
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def check_target(target: Any, key: str, original: str | None = None) -> None:
    """Check one (already rewritten) `_target_` against the allowlist, then import it.

    Args:
        target: the dotted path (or a callable, when code passes one).
        key: the config key path of the `_target_`, for the message (`model._target_`).
        original: the target as written in the config when it was rewritten.

    Raises:
        ConfigError: not allowlisted (says how to allow it), or not importable.
    """
    name = target_name(target)
    shown = f"'{name}'" + (f" (rewritten from '{original}')" if original and original != name else "")
    prefixes = allowed_prefixes()
    if not _is_allowed(name, prefixes):
        top = name.split(".")[0]
        raise ConfigError(
            f"{key}: target {shown} is not in the allowlist of module prefixes "
            f"({', '.join(prefixes)}). If you trust it, allow its module with the environment "
            f"variable {ALLOWLIST_ENV_VAR}={top} (comma-separated prefixes)."
        )
    if isinstance(target, str):
        try:
            _locate(name)
        except _TargetImportError as exc:
            raise ConfigError(f"{key}: cannot import target {shown}: {exc}") from exc.__cause__


def node_key(node: Any) -> str:
    """The full dotted key of a config node inside its root ('' for the root or a plain dict)."""
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            # Private but stable since OmegaConf 2.0, and what Hydra itself uses.
            return node._get_full_key(None)
        except Exception:  # pragma: no cover - defensive: a message detail only
            return ""
    return ""


def iter_targets(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield `(key_path, mapping)` for every mapping with a `_target_` in the tree, depth first.

    Key paths use OmegaConf's notation (`a.b[0].c`). `node` must already be resolved
    (or a plain container); non-container leaves, e.g. tensors or generators passed
    as kwargs, are never iterated.
    """
    if isinstance(node, (Mapping, DictConfig)):
        if "_target_" in node:
            yield prefix, node
        for k, v in node.items():
            yield from iter_targets(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, v in enumerate(node):
            yield from iter_targets(v, f"{prefix}[{i}]")


def target_key(path: str) -> str:
    """The key of the `_target_` of the node at `path` (`model._target_`)."""
    return f"{path}._target_" if path else "_target_"


def validate_targets(cfg: DictConfig | ListConfig | Mapping) -> None:
    """Check every `_target_` in `cfg`: allowlisted and importable, without calling any.

    NeMo AutoModel prefixes are rewritten first (see :func:`rewrite_target`), so an
    unported YAML validates as it would instantiate. Call this before expensive work.

    Args:
        cfg: the whole config (or any node of it).

    Raises:
        ConfigError: for the first offending target, naming its key path
            (e.g. `model._target_`); or when an interpolation cannot be resolved.
    """
    prefix = node_key(cfg)
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot resolve config value: {exc}") from exc
    else:
        plain = cfg
    for path, mapping in iter_targets(plain, prefix):
        raw = mapping["_target_"]
        target = rewrite_target(raw) if isinstance(raw, str) else raw
        check_target(target, target_key(path), original=raw if isinstance(raw, str) else None)
