"""Instruction data from any table: ``column_mapping`` names the columns that hold the
context (optional), the question and the answer (NeMo AutoModel's
``ColumnMappedTextInstructionDataset``, same name and arguments).

YAML::

    dataset:
      _target_: nemo_pp.datasets.llm.column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset
      path_or_dataset_id: /data/my_instructions.jsonl      # .json .jsonl .csv .parquet, a folder, or a hub id
      column_mapping: {context: definition, question: inputs, answer: targets}
      split: train
      seq_length: 256
      answer_only_loss_mask: true
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from nemo_pp.datasets.llm.loading import load_rows
from nemo_pp.datasets.llm.sft import GenerationExample, check_seq_length, check_tokenizer, prompt_answer_example
from nemo_pp.datasets.streaming import NoRandomAccess, Streamable, StreamSource, column_names

ROLES = ("context", "question", "answer")
REQUIRED_ROLES = ("question", "answer")


def _text(value: Any) -> str:
    """A cell as text: the first item of a list (answers are often lists), '' for null."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


class ColumnMappedTextInstructionDataset(Streamable, torch.utils.data.Dataset):
    """Question-answer rows from columns you name, tokenized for SFT.

    Each item is ``{"input_ids": list[int], "labels": list[int]}`` (labels aligned for
    next-token prediction, see :mod:`nemo_pp.datasets.llm.sft`). The sequence is
    ``prompt + answer + eos`` where the prompt is

    * ``use_hf_chat_template``: the tokenizer's chat template applied to one user message
      ``"{context}\\n{question}"`` with the generation prompt, the answer as it is;
    * otherwise ``"{context} {question}"`` (with the tokenizer's bos), the answer after a space.

    Truncation to ``seq_length``: the prompt is cut from the left, so the answer survives
    (:func:`~nemo_pp.datasets.llm.sft.truncate_prompt_answer`).

    Args:
        path_or_dataset_id: a ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a list of
            them, a folder, or a hub id (:func:`~nemo_pp.datasets.llm.loading.load_rows`).
        column_mapping: ``{"context": col, "question": col, "answer": col}``; context optional.
        tokenizer: a Hugging Face tokenizer with an eos token.
        split: split name, with an optional ``datasets`` slice (``train[:90%]``; not when streaming).
        name: hub configuration name.
        answer_only_loss_mask: loss on the answer tokens only (else on every token).
        seq_length: maximum ``len(input_ids)``; None: no truncation.
        limit_dataset_samples: the first N rows only.
        use_hf_chat_template: format the prompt with the tokenizer's chat template.
        padding, truncation: NeMo's arguments, accepted for compatibility: the collator pads
            and the policy above truncates.
        streaming: read and tokenize rows as training consumes them (NeMo's key;
            :mod:`nemo_pp.datasets.streaming`): :attr:`stream` is set, ``len`` and indexing
            raise ``TypeError``, iterating yields one pass of samples.

    Raises:
        ValueError: a mapping without question/answer or with another role, a column the
            data lacks (its columns listed), no chat template when one is asked for, an
            unreadable format or an empty split; streaming: a sliced split or a source
            ``datasets`` cannot stream.
        FileNotFoundError: a local path that does not exist.
    """

    def __init__(
        self,
        path_or_dataset_id: str | Sequence[str],
        column_mapping: Mapping[str, str],
        tokenizer=None,
        split: str = "train",
        name: str | None = None,
        answer_only_loss_mask: bool = True,
        seq_length: int | None = None,
        limit_dataset_samples: int | None = None,
        use_hf_chat_template: bool = False,
        padding: Any = "do_not_pad",
        truncation: Any = "do_not_truncate",
        streaming: bool = False,
    ):
        check_tokenizer(tokenizer, "ColumnMappedTextInstructionDataset")
        check_seq_length(seq_length, "dataset")
        mapping = dict(column_mapping or {})
        unknown = sorted(set(mapping) - set(ROLES))
        missing = [r for r in REQUIRED_ROLES if r not in mapping]
        if unknown or missing:
            raise ValueError(
                f"dataset.column_mapping maps the roles {ROLES} (context optional) to columns; "
                + (f"unknown roles {unknown}" if unknown else f"missing {missing}") + f", got {mapping}"
            )
        if use_hf_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("dataset.use_hf_chat_template: true, but the tokenizer has no chat template; set it to false")
        rows = load_rows(path_or_dataset_id, split, "dataset.path_or_dataset_id", name, streaming=streaming)
        columns = column_names(rows) if streaming else rows.column_names
        absent = {role: col for role, col in mapping.items() if col not in columns}
        if absent and columns:  # a stream of no rows has no columns: StreamSource says it is empty
            raise ValueError(
                f"dataset.column_mapping: the data has no column {', '.join(repr(c) for c in absent.values())} "
                f"(for {', '.join(absent)}); its columns are {columns}"
            )
        if limit_dataset_samples is not None:
            rows = (rows.take(int(limit_dataset_samples)) if streaming
                    else rows.select(range(min(int(limit_dataset_samples), len(rows)))))
        self.rows = rows  # the raw rows: the reference answer of generation_example
        self.tokenizer, self.seq_length, self.mapping = tokenizer, seq_length, mapping
        self.answer_only_loss_mask, self.use_hf_chat_template = answer_only_loss_mask, use_hf_chat_template
        if streaming:  # nothing tokenized now: the recipe's stream maps rows as it reads them
            self.stream, self.dataset = StreamSource(rows, self._tokenize_row), NoRandomAccess(type(self).__name__)
            return
        self.dataset = rows.map(self._tokenize_row, remove_columns=rows.column_names,
                                desc=f"Tokenizing {split}")

    def _prompt_ids(self, context: str, question: str) -> list[int]:
        tok = self.tokenizer
        if self.use_hf_chat_template:
            content = "\n".join(t for t in (context, question) if t)
            text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]  # the template spells its special tokens
        ids = tok(" ".join(t for t in (context, question) if t), add_special_tokens=True)["input_ids"]
        return ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids  # a bos stays, an eos would end the prompt

    def _row_prompt_ids(self, row: dict[str, Any]) -> list[int]:
        context = _text(row[self.mapping["context"]]) if "context" in self.mapping else ""
        return self._prompt_ids(context, _text(row[self.mapping["question"]]))

    def _tokenize_row(self, row: dict[str, Any]) -> dict[str, list[int]]:
        prompt = self._row_prompt_ids(row)
        answer = _text(row[self.mapping["answer"]])
        answer_ids = self.tokenizer(answer if self.use_hf_chat_template else " " + answer,
                                    add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return prompt_answer_example(prompt, answer_ids, self.seq_length, self.answer_only_loss_mask)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        row = self.dataset[int(idx)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def generation_example(self, idx: int) -> GenerationExample:
        """Row ``idx`` as a prompt to answer by generation (formatted as training formats
        it, its last ``seq_length`` tokens) and its answer column as the one reference
        (a list cell: every item a reference)."""
        row = self.rows[int(idx)]
        prompt = self._row_prompt_ids(row)
        cell = row[self.mapping["answer"]]
        answers = [_text(a) for a in cell] if isinstance(cell, (list, tuple)) else [_text(cell)]  # []: none
        return GenerationExample(prompt[-self.seq_length:] if self.seq_length else prompt, answers)
