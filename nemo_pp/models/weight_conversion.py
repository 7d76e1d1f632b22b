"""A family's checkpoint layout vs its module layout, by transformers' own conversion mapping.

transformers 5 keeps some families' tensors on disk in another layout than in memory: a
Mixtral checkpoint stores every expert's ``block_sparse_moe.experts.<e>.w1/w2/w3.weight``,
the model one fused ``mlp.experts.gate_up_proj: [E, 2I, H]`` and ``down_proj: [E, H, I]``
(``transformers.conversion_mapping``: renamings plus converters that merge and concatenate).
``from_pretrained`` applies the mapping on load and ``save_pretrained`` reverts it on save.

nemo_pp loads each stage on its own and exports each stage's shard, so it applies the same
mapping per tensor, with transformers' own ``WeightRenaming`` / ``WeightConverter`` objects
(their key renaming and their tensor operations), never a table of ours: a checkpoint in
either layout loads, and an export is in the layout ``save_pretrained`` writes.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["CheckpointSources", "checkpoint_layout_state", "checkpoint_sources"]


class CheckpointSources:
    """Where each of a model's tensors comes from in a checkpoint.

    Attributes:
        sources: ``{model FQN: [checkpoint keys]}`` (one key unless a converter merges several).
        converters: ``{model FQN: transformers WeightConverter}`` for the FQNs that need one
            (a fresh copy per tensor when loading).
    """

    def __init__(self, sources: dict[str, list[tuple[str, str | None]]], converters: dict[str, object]):
        self._sources = sources
        self.converters = converters

    @property
    def sources(self) -> dict[str, list[str]]:
        """``{model FQN: [checkpoint keys]}`` of every tensor the checkpoint can fill."""
        return {fqn: [key for key, _ in keys] for fqn, keys in self._sources.items()}

    def has(self, fqn: str) -> bool:
        """Whether the checkpoint holds what model FQN ``fqn`` needs."""
        return fqn in self._sources

    def keys_of(self, fqn: str) -> list[str]:
        """The checkpoint keys model FQN ``fqn`` is read from, in merge order.

        Raises:
            KeyError: the checkpoint has nothing for ``fqn`` (see :meth:`has`).
        """
        return [key for key, _ in self._sources[fqn]]

    def load(self, fqn: str, read: Callable[[str], torch.Tensor], model: nn.Module) -> torch.Tensor:
        """The tensor of model FQN ``fqn``: read (``read(checkpoint key)``) and, where the family's
        mapping says so, converted by transformers' converter (merge, concatenate, ...).

        Raises:
            ValueError: the converter did not produce ``fqn``.
        """
        keys = self._sources[fqn]
        template = self.converters.get(fqn)
        if template is None:
            return read(keys[0][0])
        converter = copy.deepcopy(template)
        for key, pattern in keys:
            converter.add_tensor(fqn, key, pattern, read(key))
        out = converter.convert(fqn, model=model, config=getattr(model, "config", None))
        if fqn not in out:
            raise ValueError(f"transformers' conversion of {[k for k, _ in keys]} gave {sorted(out)}, not '{fqn}'")
        return out[fqn]


def _transforms(model: nn.Module):
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # a transformers without conversion mappings stores what it holds
        return [], []
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return [], []
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def checkpoint_sources(model: nn.Module, checkpoint_keys: Sequence[str]) -> CheckpointSources:
    """Map a checkpoint's keys to ``model``'s FQNs with the family's conversion mapping
    (names only, nothing is read). A key that no transform matches maps to itself.

    Args:
        model: the (meta) Hugging Face model the checkpoint is for (None, or not a
            transformers model: every key maps to itself).
        checkpoint_keys: the tensor names of the checkpoint's safetensors files.
    """
    renamings, converters = _transforms(model)
    if not renamings and not converters:
        return CheckpointSources({k: [(k, None)] for k in checkpoint_keys}, {})
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    sources: dict[str, list[tuple[str, str | None]]] = {}
    converter_of: dict[str, object] = {}
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    # natural order: experts 0, 1, ..., 10 are merged in that order, as from_pretrained does
    for key in sorted(checkpoint_keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters)
        sources.setdefault(target, []).append((key, pattern))
        if pattern is not None:
            converter_of[target] = by_pattern[pattern]
    return CheckpointSources(sources, converter_of)


def checkpoint_layout_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (model FQNs) in the family's checkpoint layout, as ``save_pretrained`` writes
    it (transformers' ``revert_weight_conversion``); unchanged for a family without a mapping.

    Args:
        model: a Hugging Face model or pipeline stage of the family (its class and config).
        state: full CPU tensors by the model's FQNs.
    """
    renamings, converters = _transforms(model)
    if not renamings and not converters:
        return state
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state))
