"""Dotted key paths of a config, and "did you mean" suggestions over them."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["close_matches", "get_dotted_keys", "to_plain"]


def to_plain(cfg: Any) -> Any:
    """Return `cfg` as plain dicts/lists with interpolations left unresolved.

    Key lookups must not resolve `${...}`: an unset `${oc.env:X}` somewhere in the
    config should not break an unrelated override.
    """
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def _walk(node: Any, prefix: str) -> Iterator[str]:
    if isinstance(node, Mapping):
        items = ((str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else key
        yield path
        yield from _walk(value, path)


def get_dotted_keys(cfg: DictConfig | Mapping) -> list[str]:
    """List every key path of `cfg`, intermediate nodes and leaves, in config order.

    List elements appear by index (`a.items.0`), the form overrides accept.
    Interpolations are not resolved.

    Args:
        cfg: a DictConfig or a plain mapping.

    Returns:
        e.g. `["distributed", "distributed.pp_size", "distributed.pipeline", ...]`.
    """
    return list(_walk(to_plain(cfg), ""))


def close_matches(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """Up to `n` candidates similar to `word` (difflib ratio >= 0.6), best first.

    Ties are broken by the longer common prefix, so `AdamX` ranks `AdamW` before `RAdam`
    and `distributed.pp_sise` ranks `distributed.pp_size` before `distributed.tp_size`.
    """
    matcher = difflib.SequenceMatcher(b=word)
    scored = []
    for cand in set(candidates):
        matcher.set_seq1(cand)
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6:
            ratio = matcher.ratio()
            if ratio >= 0.6:
                prefix = len(os.path.commonprefix([cand, word]))
                scored.append((-ratio, -prefix, cand))
    return [cand for _, _, cand in sorted(scored)[:n]]
