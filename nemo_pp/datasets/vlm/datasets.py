"""Conversations with images, in OpenAI's ``messages`` format with content parts, rendered
by the model's processor and chat template, trained on the assistant turns.

YAML::

    dataset:
      _target_: nemo_pp.datasets.vlm.datasets.make_vlm_dataset
      path_or_dataset: /data/digits          # a folder with train.jsonl / validation.jsonl, or files
      split: train

A row: ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/7.png"},
{"type": "text", "text": "Which digit is this?"}]}, {"role": "assistant", "content":
[{"type": "text", "text": "7"}]}]}``; NeMo AutoModel's ``conversation`` column is read the same
way. An image part's ``image`` is a path, relative to the data folder (or ``image_root``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_pp.datasets.llm.loading import load_rows
from nemo_pp.datasets.llm.sft import IGNORE_INDEX, check_seq_length

logger = logging.getLogger(__name__)

#: the processor outputs that are per-image tensors of one sample (kept as tensors)
IMAGE_OUTPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")


def _image_parts(messages: list[dict]) -> list[dict]:
    return [part for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]


class VLMChatDataset(torch.utils.data.Dataset):
    """Image + conversation rows, each rendered on access by ``processor`` (its chat
    template, image processor and image-token expansion), the loss on assistant turns only.

    Each item: ``{"input_ids": list[int], "labels": list[int]`` (aligned for next-token
    prediction, -100 outside assistant turns and on image tokens), ``"pixel_values": [I, ...]
    float32`` and the processor's other per-image tensors (``image_grid_thw: [I, 3]``, ...)}``.
    A token is a label when it lies between the tokens of the turns before an assistant turn
    (with the generation prompt) and those of the turns up to it.

    Args:
        path_or_dataset: file(s) or folder read through ``datasets`` (:func:`load_rows`).
        processor: the model's ``AutoProcessor`` (tokenizer + image processor + chat template).
        split: the split (``datasets`` slice syntax allowed).
        seq_length: rows longer than this many input tokens are dropped (images cannot be cut); None: no limit.
        limit_dataset_samples: the first N rows only.
        messages_column: the column of the conversations (``messages``; ``conversation`` is found too).
        image_root: folder image paths are relative to (default: the data's folder).
        chat_template: a Jinja template replacing the processor's.

    Raises:
        ValueError: no processor or one without an image token; no conversation column; a
            row whose rendered text does not hold one image token per image (the chat
            template does not render image parts: set ``dataset.chat_template``); a row
            without an assistant turn; a missing image file; a template whose renderings of
            a conversation's first turns are not prefixes of the whole.
    """

    #: the recipe checks a vision-language model gets an image data set and the reverse
    image_text = True

    def __init__(self, path_or_dataset: str | Sequence[str], processor=None, split: str = "train",
                 seq_length: int | None = None, limit_dataset_samples: int | None = None,
                 messages_column: str = "messages", image_root: str | None = None,
                 chat_template: str | None = None, tokenizer=None):
        check_seq_length(seq_length, "dataset")
        if processor is None or getattr(processor, "image_token", None) is None:
            raise ValueError("dataset: a vision-language data set needs the model's processor (AutoProcessor) with an "
                             "image token; the model folder has none")
        self.processor, self.seq_length = processor, seq_length
        self.chat_template = chat_template or getattr(processor, "chat_template", None)
        rows = load_rows(path_or_dataset, split, "dataset.path_or_dataset")
        if messages_column not in rows.column_names and "conversation" in rows.column_names:
            messages_column = "conversation"
        if messages_column not in rows.column_names:
            raise ValueError(f"dataset.messages_column: the data has no column {messages_column!r}; its columns are "
                             f"{rows.column_names}")
        if limit_dataset_samples is not None:
            rows = rows.select(range(min(int(limit_dataset_samples), len(rows))))
        first = [path_or_dataset] if isinstance(path_or_dataset, str) else list(path_or_dataset)
        root = Path(image_root) if image_root else (Path(first[0]) if Path(first[0]).is_dir() else Path(first[0]).parent)
        self.root = root
        self.rows = [self._check_row(i, m) for i, m in enumerate(rows[messages_column])]
        if seq_length is not None:
            kept = [m for m in self.rows if len(self._encode(m)["input_ids"]) - 1 <= seq_length]
            if len(kept) < len(self.rows):
                logger.warning("dataset: dropped %d of %d rows longer than seq_length=%d", len(self.rows) - len(kept),
                               len(self.rows), seq_length)
            if not kept:
                raise ValueError(f"dataset: every row is longer than dataset.seq_length={seq_length}; raise it")
            self.rows = kept

    def _check_row(self, index: int, messages: list[dict]) -> list[dict]:
        if not isinstance(messages, list) or not any(m.get("role") == "assistant" for m in messages):
            raise ValueError(f"dataset: row {index} has no assistant turn")
        images = _image_parts(messages)
        for part in images:
            if not (self.root / str(part.get("image"))).is_file():
                raise ValueError(f"dataset: row {index}'s image {part.get('image')!r} is not a file under {self.root} "
                                 "(set dataset.image_root)")
        text = self._render(messages)
        found = text.count(self.processor.image_token)
        if found != len(images):
            raise ValueError(
                f"dataset: row {index} has {len(images)} image(s) but its rendered text holds {found} image token(s) "
                f"({self.processor.image_token!r}); the chat template must render image parts: set dataset.chat_template")
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode(self, messages: list[dict], add_generation_prompt: bool = False) -> dict:
        from PIL import Image

        images = [Image.open(self.root / str(p["image"])).convert("RGB") for p in _image_parts(messages)]
        return self.processor(text=self._render(messages, add_generation_prompt), images=images or None,
                              return_tensors="pt", add_special_tokens=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        messages = self.rows[int(idx)]
        enc = self._encode(messages)
        tokens = enc["input_ids"][0].tolist()
        targets = [IGNORE_INDEX] * len(tokens)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self._encode(messages[:i], add_generation_prompt=True)["input_ids"][0]) if i else 0
            prefix = self._encode(messages[: i + 1])["input_ids"][0].tolist()
            if prefix != tokens[: len(prefix)]:
                raise ValueError("dataset.chat_template: rendering the first turns of a conversation does not give a "
                                 "prefix of the whole, so assistant turns cannot be located")
            targets[start: len(prefix)] = tokens[start: len(prefix)]
        item = {"input_ids": tokens[:-1], "labels": targets[1:]}
        item.update({k: enc[k] for k in IMAGE_OUTPUTS if k in enc})
        return item


def make_vlm_dataset(path_or_dataset: str | Sequence[str], processor=None, split: str = "train",
                     **kwargs) -> VLMChatDataset:
    """NeMo AutoModel's maker-style entry point: :class:`VLMChatDataset` of ``path_or_dataset``."""
    return VLMChatDataset(path_or_dataset, processor=processor, split=split, **kwargs)


make_vlm_dataset.image_text = True
