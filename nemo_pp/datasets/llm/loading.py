"""Rows of a user's data set through the ``datasets`` library: local files (JSON, JSONL,
CSV, Parquet, plain text), a folder of them, or a hub id when a network exists.

Every error names the config key (``dataset.path_or_dataset_id``, ...) and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from nemo_pp.assets import looks_like_local_path

# file extension -> the ``datasets`` builder that reads it
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _builder(files: Sequence[Path], key: str) -> str:
    kinds = {FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in FORMATS)
        raise ValueError(f"{key}: cannot read {bad}: unknown format {bad.suffix!r}; nemo_pp reads "
                         f"{', '.join(FORMATS)} files (or a hub id)")
    if len(kinds) > 1:
        raise ValueError(f"{key}: the files mix formats ({', '.join(sorted(kinds))}); give files of one format")
    return kinds.pop()


def load_rows(path_or_dataset_id: str | Sequence[str], split: str = "train", key: str = "dataset.path_or_dataset_id",
              name: str | None = None, text_sample_by: str = "line", streaming: bool = False):
    """Load one split as a ``datasets.Dataset`` (a ``datasets.IterableDataset`` when streaming).

    Args:
        path_or_dataset_id: a file, a list of files, a folder, or a hub id.
            - files: read with the builder of their extension (:data:`FORMATS`), as the
              split named by ``split`` without its slice (``train[:90%]`` -> ``train``);
            - a folder: its files grouped into splits by name (``train.jsonl``,
              ``validation-00000.parquet``, ``dev.csv``: the hub's conventions); a folder
              whose file names name no split is one split;
            - anything else: a hub id (with ``name`` as its configuration).
        split: a split name with an optional slice (``datasets`` syntax: ``train[90%:]``).
        key: the config key that gave ``path_or_dataset_id`` (named in errors).
        name: hub configuration name.
        text_sample_by: what one row of a ``.txt`` file is: ``line``, ``paragraph``
            (lines up to a blank line) or ``document`` (the whole file); the ``datasets``
            text builder's ``sample_by``.
        streaming: read the rows lazily (``load_dataset(..., streaming=True)``): nothing is
            read or cached here; the split may not be sliced and its emptiness is not checked
            (:class:`~nemo_pp.datasets.streaming.StreamSource` reads its first row).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: an unknown file format, a split the data lacks (the available ones
            listed), or an empty split; streaming: a sliced split, or a source ``datasets``
            cannot stream (naming ``dataset.streaming``).
    """
    import datasets

    paths = [path_or_dataset_id] if isinstance(path_or_dataset_id, str) else list(path_or_dataset_id)
    if not paths:
        raise ValueError(f"{key} is empty: give a file, a list of files, a folder or a hub id")
    base = split.split("[", 1)[0]
    if any(looks_like_local_path(str(p)) for p in paths):
        files: list[Path] = []
        for p in map(lambda x: Path(str(x)).expanduser(), paths):
            if not p.exists():
                raise FileNotFoundError(f"{key}: {p} does not exist")
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
                         if p.is_dir() else [p])
        if not files:
            raise ValueError(f"{key}: no data files in {paths}")
        by_split = _files_by_split(files) if len(paths) == 1 and Path(paths[0]).expanduser().is_dir() else None
        if by_split is not None:
            if base not in by_split:
                raise ValueError(f"{key}: {paths[0]} has no split {base!r} (its files give {sorted(by_split)})")
            files = by_split[base]
        builder = _builder(files, key)
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"{key}: split {split!r} of {paths[0]} has no rows: its files are empty")
        extra = {"sample_by": text_sample_by} if builder == "text" else {}
        rows = load_split(lambda s: datasets.load_dataset(builder, data_files={base: [str(f) for f in files]}, split=s,
                                                     streaming=streaming, **extra), split, key, paths[0], streaming)
        return rows if streaming else _check_rows(rows, split, key, paths[0])
    rows = load_split(lambda s: datasets.load_dataset(paths[0], name, split=s, streaming=streaming), split, key,
                      paths[0], streaming)
    return rows if streaming else _check_rows(rows, split, key, paths[0])


# file-name prefixes of a folder's splits, as the hub names them
_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                "dev": "validation", "eval": "validation", "test": "test"}


def _files_by_split(files: Sequence[Path]) -> dict[str, list[Path]] | None:
    """A folder's files grouped by the split their names start with (``train.jsonl``,
    ``validation-00000.parquet``, ``dev.csv``), or None when no name carries a split:
    then every file is one split."""
    out: dict[str, list[Path]] = {}
    for f in files:
        stem = re.split(r"[.\-_]", f.name, maxsplit=1)[0].lower()
        if stem in _SPLIT_NAMES:
            out.setdefault(_SPLIT_NAMES[stem], []).append(f)
    return out or None


def load_split(fn, split: str, key: str, source, streaming: bool = False):
    """``fn(split)`` (a ``datasets.load_dataset`` call) with its failures as ``ValueError``
    naming ``key``: a file its builder cannot parse, a split or slice of no rows (also the
    JSON builder's bare ``StopIteration`` on empty files), a split the data lacks; with
    ``streaming``, a sliced split or a source ``datasets`` cannot stream (naming the
    section's ``streaming`` key)."""
    from datasets.exceptions import DatasetGenerationError

    from nemo_pp.datasets.streaming import refuse_sliced_split

    section = key.split(".", 1)[0]
    if streaming:
        refuse_sliced_split(split, section)
    try:
        return fn(split)
    except NotImplementedError as exc:  # a builder without a streaming reader
        if not streaming:
            raise
        raise ValueError(f"{section}.streaming: true, but `datasets` cannot stream {source} ({exc}); set "
                         f"{section}.streaming: false") from None
    except StopIteration:  # the JSON builder on files of no rows: next() over no tables
        raise ValueError(f"{key}: split {split!r} of {source} has no rows; check the file or the split slice") from None
    except DatasetGenerationError as exc:  # a file its builder cannot parse
        raise ValueError(f"{key}: cannot read {source}: {exc.__cause__ or exc}") from None
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # a slice of nothing (datasets' wording)
            raise ValueError(f"{key}: split {split!r} of {source} has no rows; check the file or the split slice") from None
        if "split" in str(exc).lower():  # datasets: 'Unknown split "x". Should be one of [...]'
            raise ValueError(f"{key}: {source} has no split {split!r} ({exc})") from None
        raise


def _check_rows(rows, split: str, key: str, source):
    if len(rows) == 0:
        raise ValueError(f"{key}: split {split!r} of {source} has no rows; check the file or the split slice")
    return rows
