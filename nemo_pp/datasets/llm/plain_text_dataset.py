"""Plain text for causal-LM training: documents tokenized, joined with eos and cut into
``seq_length`` blocks (the "group texts" recipe of Hugging Face's ``run_clm`` example).

YAML::

    dataset:
      _target_: nemo_pp.datasets.llm.plain_text_dataset.PlainTextDataset
      path_or_dataset_id: /data/books/          # .txt files (one split), or a table with a text column
      split: train
      seq_length: 256
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nemo_pp.datasets.llm.loading import load_rows
from nemo_pp.datasets.llm.sft import check_seq_length, check_tokenizer


class PlainTextDataset(torch.utils.data.Dataset):
    """Every token of the text is a label.

    The documents (one per row: a paragraph of a ``.txt`` file, as the ``datasets`` text
    builder splits it at blank lines, or a cell of ``text_column``) are tokenized without
    special tokens, each followed by eos,
    concatenated in order and cut into blocks of ``seq_length + 1`` tokens;
    ``input_ids = block[:-1]``, ``labels = block[1:]``. The last partial block is
    dropped, so every item has exactly ``seq_length`` tokens and no padding.

    Args:
        path_or_dataset_id: ``.txt`` files or a folder of them, or any table
            (:func:`~nemo_pp.datasets.llm.loading.load_rows`).
        tokenizer: a Hugging Face tokenizer with an eos token.
        seq_length: tokens per item. Required.
        split: split name, with an optional ``datasets`` slice (``train[:95%]``).
        name: hub configuration name.
        text_column: the column holding the text (``text`` for ``.txt`` files).
        limit_dataset_samples: at most this many blocks.
        sample_by: what one document of a ``.txt`` file is: ``paragraph`` (eos marks
            paragraph ends), ``line`` or ``document`` (a whole file).

    Raises:
        ValueError: no ``seq_length``, no ``text_column`` (the columns listed), less text
            than one block, an unreadable format or an empty split.
    """

    def __init__(
        self,
        path_or_dataset_id: str | Sequence[str],
        tokenizer=None,
        seq_length: int | None = None,
        split: str = "train",
        name: str | None = None,
        text_column: str = "text",
        limit_dataset_samples: int | None = None,
        sample_by: str = "paragraph",
    ):
        check_tokenizer(tokenizer, "PlainTextDataset")
        if seq_length is None:
            raise ValueError("dataset.seq_length is required for plain text: the length of every block")
        check_seq_length(seq_length, "dataset")
        if sample_by not in ("paragraph", "line", "document"):
            raise ValueError(f"dataset.sample_by must be paragraph, line or document, not {sample_by!r}")
        rows = load_rows(path_or_dataset_id, split, "dataset.path_or_dataset_id", name, text_sample_by=sample_by)
        if text_column not in rows.column_names:
            raise ValueError(f"dataset.text_column: the data has no column {text_column!r}; its columns are "
                             f"{rows.column_names}")
        documents = [t.strip("\n") for t in rows[text_column] if t and t.strip()]
        eos = tokenizer.eos_token_id
        ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
        stream = [t for doc in ids for t in doc + [eos]]
        block = seq_length + 1
        n = len(stream) // block
        if limit_dataset_samples is not None:
            n = min(n, int(limit_dataset_samples))
        if n == 0:
            raise ValueError(f"dataset: {len(stream)} tokens of text, fewer than one block of seq_length + 1 = {block}")
        self.blocks = torch.tensor(stream[: n * block], dtype=torch.int64).view(n, block)
        self.num_tokens = len(stream)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        b = self.blocks[int(idx)]
        return {"input_ids": b[:-1].tolist(), "labels": b[1:].tolist()}

