"""Batches of :class:`~nemo_pp.datasets.vlm.datasets.VLMChatDataset` items for the pipeline:
text right-padded as for text data, images **batch-major** so torch's per-microbatch split
along axis 0 gives each microbatch its own samples' images (:mod:`nemo_pp.models.vlm`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nemo_pp.datasets.utils import SFTCollator
from nemo_pp.datasets.vlm.datasets import IMAGE_OUTPUTS
from nemo_pp.models.vlm import FAMILIES, batch_images


class VLMCollator:
    """Picklable ``collate_fn`` for vision-language items.

    Args:
        model_type: the model config's ``model_type`` (its family lays images out).
        pad_token_id / pad_seq_len_divisible: as :class:`~nemo_pp.datasets.utils.SFTCollator`.

    Returns (per call): ``{"input_ids": [B, S] int64, "labels": [B, S] int64, "num_tokens": [B],
    "pixel_values": [B, I, ...] or [B, P, D] float32, "num_images": [B] int64, ...}``.
    """

    def __init__(self, model_type: str, pad_token_id: int = 0, pad_seq_len_divisible: int | None = None):
        self.family = FAMILIES[model_type]
        self.model_type = model_type
        self.text = SFTCollator(pad_token_id, pad_seq_len_divisible)

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text = [{k: v for k, v in item.items() if k not in IMAGE_OUTPUTS} for item in batch]
        out = self.text(text)
        out.update(batch_images(self.family, [{k: item[k] for k in IMAGE_OUTPUTS if k in item} for item in batch]))
        return out

    def __repr__(self) -> str:
        return f"VLMCollator({self.model_type!r}, {self.text!r})"
