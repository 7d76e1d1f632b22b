"""Sequence packing: several samples in one row, each keeping its own positions and
attending only to itself (NeMo AutoModel's ``packed_sequence.packed_sequence_size``).

A packed row carries ``position_ids`` that restart at 0 for every sample. With no
attention mask, Hugging Face's mask builder (``transformers.masking_utils
.find_packed_sequence_indices``) reads the restarts and builds a block-causal mask, so the
logits of each sample equal those of the sample alone. Under the pipeline the engine
hands ``position_ids`` to every stage with the microbatch (torch's schedules pass step
kwargs to each stage's forward), so no extra tensor crosses the stage boundaries.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

logger = logging.getLogger(__name__)


T = TypeVar("T")


def greedy_packs(items: Iterable[T], length: Callable[[T], int], size: int) -> Iterator[list[T]]:
    """Group ``items`` in order into packs of at most ``size`` tokens, lazily (the rule of
    :class:`PackedSequenceDataset` and of a streamed data set's packs).

    An item joins the current pack while it fits; otherwise the pack is yielded and the
    item starts the next one. An item longer than ``size`` counts as ``size`` tokens
    (:func:`pack_row` cuts it). So a pack is yielded only once the item after it has been
    read: the item that then starts the next pack. The last pack is yielded when
    ``items`` ends.

    Args:
        items: anything; ``length(item)`` its tokens.
        size: tokens per pack (>= 1).

    Yields:
        lists of consecutive items, none empty.
    """
    current: list[T] = []
    used = 0
    for item in items:
        n = min(length(item), size)
        if current and used + n > size:
            yield current
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        yield current


def pack_row(samples: Sequence[dict], size: int) -> dict[str, list[int]]:
    """One packed row of ``samples`` (``{"input_ids", "labels"}`` lists of ints), each cut
    to ``size`` tokens: ``{"input_ids", "labels", "position_ids"}`` of their concatenation,
    the positions restarting at 0 for every sample."""
    ids, labels, positions = [], [], []
    for item in samples:
        n = min(len(item["input_ids"]), size)
        ids += list(item["input_ids"][:n])
        labels += list(item["labels"][:n])
        positions += list(range(n))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _lengths(dataset) -> list[int]:
    inner = getattr(dataset, "dataset", None)  # datasets-backed sets: the column, without decoding rows
    if inner is not None and hasattr(inner, "column_names") and "input_ids" in inner.column_names:
        return [len(ids) for ids in inner["input_ids"]]
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Samples of ``dataset`` packed greedily, in order, into rows of at most
    ``packed_sequence_size`` tokens.

    A sample joins the current row while it fits; otherwise it starts the next row. A
    sample longer than a row is cut to ``packed_sequence_size`` tokens (counted in the
    log). Each item is ``{"input_ids", "labels", "position_ids"}`` (lists of ints, labels
    aligned as the samples' were); the collator pads the row to ``packed_sequence_size``.

    Args:
        dataset: items ``{"input_ids": list[int], "labels": list[int]}``.
        packed_sequence_size: tokens per row.
        split_across_pack: NeMo's option to continue a sample in the next row; only False
            is supported (a split sample would lose the attention to its first part).

    Raises:
        ValueError: ``packed_sequence_size`` < 1, ``split_across_pack`` true, or an empty dataset.
    """

    def __init__(self, dataset, packed_sequence_size: int, split_across_pack: bool = False):
        if packed_sequence_size < 1:
            raise ValueError(f"packed_sequence.packed_sequence_size must be >= 1, got {packed_sequence_size}")
        if split_across_pack:
            raise ValueError("packed_sequence.split_across_pack: true is not supported (the second part of a sample "
                             "could not attend to its first); set it to false")
        self.dataset, self.size = dataset, packed_sequence_size
        lengths = _lengths(dataset)
        self.packs: list[list[int]] = list(greedy_packs(range(len(lengths)), lengths.__getitem__, packed_sequence_size))
        cut = sum(n >= packed_sequence_size for n in lengths)
        if not self.packs:
            raise ValueError("packed_sequence: the data set is empty")
        if cut:
            logger.info("packed_sequence: %d samples fill a whole row of %d tokens (longer ones are cut)", cut,
                        packed_sequence_size)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return pack_row([self.dataset[i] for i in self.packs[int(idx)]], self.size)
