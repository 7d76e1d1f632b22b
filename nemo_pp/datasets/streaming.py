"""Streamed data sets (``dataset.streaming: true``): rows are read, tokenized and packed as
training consumes them, so no split is ever held whole in memory or in ``datasets``' cache.

Each data-parallel rank runs one pipeline, ``datasets.IterableDataset`` operations up to the
packer::

    rows      load_dataset(..., streaming=True), .take(limit_dataset_samples)
    .skip(k)  resume: the rows every rank consumed before, k = rows per rank * dp
    blocks    whole blocks of dp rows (.batch(dp, drop_last_batch=True), flattened)
    split     split_dataset_by_node(rank, dp, strategy="examples"): rank r keeps rows r, r + dp, ...
              (rank_rows: a filter on the row index where datasets predates strategy=)
    .map      the data set's own tokenizer function (row -> {"input_ids", "labels"})
    packs     greedy packs (packed_sequence.packed_sequence_size), packed_sequence's rule

Why ``strategy="examples"`` and whole blocks: ``split_dataset_by_node``'s default hands
whole files to ranks when their count divides dp, and with one file the ranks below
``rows % dp`` read one row more. Either way ranks would end a pass at different steps. With
whole blocks every rank reads as many rows per pass (the last ``rows % dp`` are dropped, as
``DistributedSampler(drop_last=True)`` drops them), the ranks reach a pass's end together,
and the global order is the file order at every dp size: the first ``n`` rows the group
consumed are the first ``n`` rows of the file.

Position (:class:`StreamPosition`): the pass over the source (``epoch``) and the rows of this
rank's share of it consumed. Unpacked, every rank is at the same place and ``rows * dp`` is
the global sample count, which resumes at any dp size (``.skip`` before the split). Packed,
a rank's position counts the rows in the packs it handed out; the row read after its last
pack (the one that did not fit) is read again on resume and starts the next pack, as it did
in the uninterrupted run, so no token buffer needs saving, but the per-rank positions hold
only at the dp size that made them. A pass that ends starts the next one
(``epoch + 1``); a packed rank may be a pass ahead of another.

``datasets``' own ``IterableDataset.state_dict()`` is not used: it is per rank and opaque
(no resume at another dp size), and its documentation lists the cases it does not restore
exactly (shuffle buffers, batched maps over arrow). Skipping rows is exact; it re-reads them
(JSON/Parquet parsing, no tokenizing) on resume.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from nemo_pp.datasets.packed_sequence import greedy_packs, pack_row


def column_names(rows) -> list[str]:
    """The columns of a ``datasets.IterableDataset`` (its first row's keys when its features
    are unknown); [] for a stream of no rows."""
    return list(rows.column_names or next(iter(rows), {}))


def refuse_sliced_split(split: str, key: str = "dataset") -> None:
    """A streamed split cannot be sliced (``datasets`` slices by row counts it does not know).

    Raises:
        ValueError: ``split`` holds a slice (``train[:90%]``), naming ``{key}.split``.
    """
    if "[" in str(split):
        raise ValueError(f"{key}.split={split!r}: a streamed split cannot be sliced ({key}.streaming: true reads rows "
                         f"without knowing their count); give the split name alone and {key}.limit_dataset_samples "
                         f"for the first N rows, or set {key}.streaming: false")


def complete_blocks(rows, dp: int):
    """``rows`` cut to whole blocks of ``dp`` rows (the last ``len % dp`` dropped), lazily."""
    if dp == 1:
        return rows
    blocks = rows.batch(dp, drop_last_batch=True)
    return blocks.map(lambda block: {c: [v for b in block[c] for v in b] for c in block}, batched=True, batch_size=1)


def rank_rows(rows, dp: int, rank: int):
    """Rows ``rank``, ``rank + dp``, ... of ``rows``, lazily:
    ``datasets.distributed.split_dataset_by_node(strategy="examples")``, or on a ``datasets``
    without that argument (before 5.2) the same selection by a filter on the row index (the
    older default may hand whole files to ranks, an order that depends on dp)."""
    from datasets.distributed import split_dataset_by_node

    try:
        return split_dataset_by_node(rows, rank=rank, world_size=dp, strategy="examples")
    except TypeError:
        return every_nth_row(rows, dp, rank)


def every_nth_row(rows, n: int, offset: int):
    """Rows ``offset``, ``offset + n``, ... of a ``datasets.IterableDataset``, lazily."""
    return rows.filter(lambda _row, i: i % n == offset, with_indices=True)


class StreamSource:
    """The rows of one split as ``datasets`` streams them, and the function that tokenizes a row.

    Args:
        rows: a ``datasets.IterableDataset`` of raw rows (``load_dataset(..., streaming=True)``).
        tokenize: ``row -> {"input_ids": list[int], "labels": list[int]}`` (the data set's
            map-style tokenizer function, so both modes make the same samples).
        key: the config section, named in errors.

    Raises:
        ValueError: the stream has no rows (its first row is read here, so a file the
            format's reader cannot parse fails here too, before training).
    """

    def __init__(self, rows, tokenize: Callable[[dict], dict], key: str = "dataset"):
        self.columns = column_names(rows)
        if not self.columns:
            raise ValueError(f"{key} is empty: its stream has no rows; check {key}.split and the files")
        self.rows, self.tokenize, self.key = rows, tokenize, key

    def samples(self, dp: int = 1, rank: int = 0, skip: int = 0):
        """Data-parallel rank ``rank``'s tokenized samples of one pass, after the first ``skip``
        rows of the source: rows ``skip + rank``, ``skip + rank + dp``, ... of whole blocks.

        Returns:
            a ``datasets.IterableDataset`` of ``{"input_ids": list[int], "labels": list[int]}``.
        """
        rows = self.rows.skip(skip) if skip else self.rows
        if dp > 1:
            rows = rank_rows(complete_blocks(rows, dp), dp, rank)
        return rows.map(self.tokenize, remove_columns=self.columns)

    def first(self, n: int) -> list[dict]:
        """The first ``n`` tokenized samples (fewer when the stream is shorter)."""
        out = []
        for sample in self.samples():
            if len(out) == n:
                break
            out.append(sample)
        return out


class NoRandomAccess:
    """Stands in for the tokenized table of a streamed data set: ``len`` and indexing raise
    a ``TypeError`` that says why (a stream has neither), instead of a ``None`` error."""

    def __init__(self, owner: str):
        self.owner = owner

    def _refuse(self):
        raise TypeError(f"{self.owner} with streaming=True has no length and no random access: iterate it, or "
                        "train on it (the recipe reads it as a stream)")

    def __len__(self) -> int:
        self._refuse()

    def __getitem__(self, idx):
        self._refuse()


class Streamable:
    """Mixin of the data sets that can stream: ``can_stream`` tells the plan so; with
    ``streaming=True`` the data set sets :attr:`stream` and iterating it yields one pass of
    tokenized samples, ``{"input_ids": list[int], "labels": list[int]}``."""

    can_stream = True
    stream: StreamSource | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.stream is None:
            return (self[i] for i in range(len(self)))
        return iter(self.stream.samples())


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream stands: pass ``epoch`` over the source, ``rows`` of this rank's
    share of that pass consumed (unpacked: samples handed out; packed: rows in packs handed out)."""

    epoch: int = 0
    rows: int = 0


class RankStream(torch.utils.data.IterableDataset):
    """One data-parallel rank's endless items of a :class:`StreamSource`: its share of each
    pass, packed when ``packed_sequence_size`` > 0, the next pass after the last.

    Items: ``{"input_ids", "labels"}`` (lists of ints), packed ones with ``position_ids``.
    :attr:`position` is the :class:`StreamPosition` after the last item handed out; read it
    between batches (a ``DataLoader`` with ``num_workers=0`` takes exactly ``batch_size``
    items per batch, so it is the position after the last batch).

    Args:
        source: the stream.
        dp_size, dp_rank: this rank's share.
        packed_sequence_size: tokens per packed row; 0: one sample per item.

    Raises:
        ValueError (while iterating): a whole pass gives this rank no item (fewer rows than
            ``dp_size``).
    """

    def __init__(self, source: StreamSource, dp_size: int, dp_rank: int, packed_sequence_size: int = 0):
        super().__init__()
        self.source, self.dp, self.rank, self.pack = source, dp_size, dp_rank, packed_sequence_size
        self.start = self.position = StreamPosition()

    def restore(self, position: StreamPosition) -> None:
        """Start (the next iteration) at ``position``."""
        self.start = self.position = position

    def global_samples(self) -> int:
        """Rows of the current pass the whole data-parallel group consumed (exact unpacked;
        packed, this rank's rows times dp)."""
        return self.position.rows * self.dp

    def _items(self, skip_rows: int) -> Iterator[tuple[dict, int]]:
        """``(item, rows it consumed)`` of one pass after this rank's first ``skip_rows`` rows."""
        samples = self.source.samples(self.dp, self.rank, skip_rows * self.dp)
        if not self.pack:
            for s in samples:
                yield {"input_ids": s["input_ids"], "labels": s["labels"]}, 1
            return
        for group in greedy_packs(samples, lambda s: len(s["input_ids"]), self.pack):
            yield pack_row(group, self.pack), len(group)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        pos = copy.copy(self.start)
        while True:
            produced = False
            for item, rows in self._items(pos.rows):
                pos = dataclasses.replace(pos, rows=pos.rows + rows)
                self.position, produced = pos, True  # before the yield: the item is handed out
                yield item
            if not produced and pos.rows == 0:
                raise ValueError(f"{self.source.key}: a whole pass of the stream gives data-parallel rank {self.rank} "
                                 f"no sample: it holds fewer rows than the {self.dp} ranks")
            pos = StreamPosition(pos.epoch + 1, 0)
