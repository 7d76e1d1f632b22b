"""Conversations in OpenAI's ``messages`` format, trained on the assistant turns
(NeMo AutoModel's ``ChatDataset``, same name and main arguments).

YAML::

    dataset:
      _target_: nemo_pp.datasets.llm.chat_dataset.ChatDataset
      path_or_dataset_id: /data/chats.jsonl   # rows: {"messages": [{"role": "user", "content": ...}, ...]}
      split: train
      seq_length: 512
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from nemo_pp.datasets.llm.loading import load_rows
from nemo_pp.datasets.llm.sft import IGNORE_INDEX, check_seq_length, check_tokenizer

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


def invalid_reason(messages: Any) -> str | None:
    """Why ``messages`` cannot be trained on (None when it can): not a list of
    ``{"role", "content"}`` dicts with known roles, or no assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"a message is not {{'role': one of {ROLES}, 'content': str}}: {str(m)[:80]}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


class ChatDataset(torch.utils.data.Dataset):
    """Multi-turn chats tokenized with a chat template, the loss on assistant turns only.

    Each item is ``{"input_ids": list[int], "labels": list[int]}`` (labels aligned for
    next-token prediction). The conversation is rendered once with the chat template; a
    token is a label when its characters lie in an assistant turn, i.e. between the
    rendering of the turns before it with the generation prompt and the rendering that
    includes it (the template's end-of-turn tokens are learned, the role headers not).
    This needs a template whose renderings of a conversation's prefixes are prefixes of
    its rendering (ChatML, Llama 3, Gemma, Mistral's; checked for every row).

    Truncation (``seq_length``): a chat longer than ``seq_length + 1`` tokens is cut on
    the right (its last turns are dropped); a chat with no assistant token left is
    dropped, and the count of dropped rows is logged.

    Args:
        path_or_dataset_id: file(s), folder or hub id
            (:func:`~nemo_pp.datasets.llm.loading.load_rows`) with a ``messages`` column.
        tokenizer: a Hugging Face tokenizer (a fast one: token offsets are used).
        split: split name, with an optional ``datasets`` slice.
        name: hub configuration name.
        seq_length: maximum ``len(input_ids)``; None: no truncation.
        chat_template: a Jinja template replacing the tokenizer's.
        limit_dataset_samples: the first N rows only.
        skip_invalid_samples: drop rows without an assistant turn or with malformed
            messages (counted in the log) instead of refusing the data set.
        messages_column: the column holding the messages.

    Raises:
        ValueError: no chat template, a slow tokenizer, no ``messages_column`` (the
            columns listed), invalid rows (counted, with the first one's index and
            reason) without ``skip_invalid_samples``, a template that is not
            prefix-consistent, no trainable row left, an unreadable format or an empty split.
    """

    def __init__(
        self,
        path_or_dataset_id: str | Sequence[str],
        tokenizer=None,
        split: str = "train",
        name: str | None = None,
        seq_length: int | None = None,
        chat_template: str | None = None,
        limit_dataset_samples: int | None = None,
        skip_invalid_samples: bool = False,
        messages_column: str = "messages",
        padding: Any = "do_not_pad",
        truncation: Any = "do_not_truncate",
    ):
        check_tokenizer(tokenizer, "ChatDataset")
        check_seq_length(seq_length, "dataset")
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("ChatDataset: the tokenizer has no chat template; set dataset.chat_template to one")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("ChatDataset needs a fast tokenizer (token character offsets); load it with use_fast=True")
        rows = load_rows(path_or_dataset_id, split, "dataset.path_or_dataset_id", name)
        if messages_column not in rows.column_names:
            raise ValueError(f"dataset.messages_column: the data has no column {messages_column!r}; its columns "
                             f"are {rows.column_names}")
        if limit_dataset_samples is not None:
            rows = rows.select(range(min(int(limit_dataset_samples), len(rows))))
        reasons = [invalid_reason(m) for m in rows[messages_column]]
        bad = [i for i, r in enumerate(reasons) if r is not None]
        if bad and not skip_invalid_samples:
            raise ValueError(
                f"dataset: {len(bad)} of {len(rows)} rows cannot be trained on (first: row {bad[0]}, "
                f"{reasons[bad[0]]}); fix them or set dataset.skip_invalid_samples: true to drop them"
            )
        if bad:
            logger.warning("dataset: dropped %d of %d rows without an assistant turn or with malformed messages",
                           len(bad), len(rows))
            rows = rows.select([i for i, r in enumerate(reasons) if r is None])
        self.tokenizer, self.seq_length, self.column = tokenizer, seq_length, messages_column
        tokenized = rows.map(self._tokenize_row, remove_columns=rows.column_names, desc=f"Tokenizing chats ({split})")
        trainable = [i for i, n in enumerate(tokenized["num_label_tokens"]) if n > 0]
        if len(trainable) < len(tokenized):
            logger.warning("dataset: dropped %d chats whose assistant turns all lie beyond seq_length=%s",
                           len(tokenized) - len(trainable), seq_length)
        if not trainable:
            raise ValueError(f"dataset: no chat keeps an assistant token within seq_length={seq_length}; raise it")
        self.dataset = tokenized.select(trainable)

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the ``[start, end)`` character spans of its assistant turns.

        Raises:
            ValueError: the template renders a prefix of the chat as something that is not
                a prefix of the whole rendering.
        """
        text = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._render(messages[:i], add_generation_prompt=True) if i else ""
            end = self._render(messages[: i + 1])
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise ValueError(
                    "dataset.chat_template: rendering the first turns of a chat does not give a prefix of the whole "
                    "chat, so assistant turns cannot be located; use a template that renders turns in order"
                )
            spans.append((len(start), len(end)))
        return text, spans

    def _tokenize_row(self, row: dict[str, Any]) -> dict[str, Any]:
        text, spans = self.assistant_spans(row[self.column])
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = enc["input_ids"]
        # a token trains when it starts inside an assistant span
        targets = [t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
                   for t, (a, _) in zip(tokens, enc["offset_mapping"])]
        if self.seq_length is not None:
            tokens, targets = tokens[: self.seq_length + 1], targets[: self.seq_length + 1]
        labels = targets[1:]
        return {"input_ids": tokens[:-1], "labels": labels,
                "num_label_tokens": sum(1 for t in labels if t != IGNORE_INDEX)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        row = self.dataset[int(idx)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}
