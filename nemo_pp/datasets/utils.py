"""Batch collation for token-level SFT / LM data."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nemo_pp.loss import IGNORE_INDEX


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def default_collater(
    batch: Sequence[dict[str, Any]],
    pad_seq_len_divisible: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into int64 tensors.

    Every example must carry the same keys, each a list of ints. The common length is
    the longest example rounded UP to a multiple of ``pad_seq_len_divisible`` (pipeline
    stages and TP/CP shardings want a sequence length they can divide).

    Padding values: ``input_ids`` -> ``pad_token_id``; ``labels`` -> -100 (ignored by the
    loss); any other list key (``attention_mask``, ``position_ids``, ...) -> 0.

    Args:
        batch: ``[{"input_ids": list[int], "labels": list[int], ...}, ...]``, non-empty.
        pad_seq_len_divisible: pad the length to a multiple of this (None/1: no rounding).
        pad_token_id: value for padded ``input_ids``.

    Returns:
        ``{"input_ids": int64 [B, S], "labels": int64 [B, S], ...}``.

    Raises:
        ValueError: empty batch, examples with different keys, or a value that is not
            a list/tuple/1-D tensor of ints.
    """
    if len(batch) == 0:
        raise ValueError("default_collater got an empty batch")
    keys = list(batch[0].keys())
    for i, ex in enumerate(batch):
        if set(ex.keys()) != set(keys):
            raise ValueError(f"example {i} has keys {sorted(ex)}, example 0 has {sorted(keys)}")

    rows: dict[str, list[list[int]]] = {}
    for key in keys:
        rows[key] = []
        for i, ex in enumerate(batch):
            value = ex[key]
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                value = value.tolist()
            if not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"cannot collate key {key!r} of example {i}: expected a list of ints, "
                    f"got {type(value).__name__}"
                )
            rows[key].append(list(value))

    max_len = max(len(r) for seqs in rows.values() for r in seqs)
    length = _round_up(max_len, pad_seq_len_divisible)
    out: dict[str, torch.Tensor] = {}
    for key, seqs in rows.items():
        pad = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        out[key] = torch.tensor([s + [pad] * (length - len(s)) for s in seqs], dtype=torch.int64)
    return out


class SFTCollator:
    """Picklable ``collate_fn`` wrapping :func:`default_collater` (DataLoader workers
    are spawned processes, so no lambdas or closures). Adds ``num_tokens``: int64 [B],
    each row's tokens before padding (the metrics' non-padding token count; the model
    never sees it).

    Args:
        pad_token_id: value for padded ``input_ids``.
        pad_seq_len_divisible: pad the length to a multiple of this (a packed row's
            length: every packed batch then has one shape).
    """

    def __init__(self, pad_token_id: int = 0, pad_seq_len_divisible: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_seq_len_divisible = pad_seq_len_divisible

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = default_collater(batch, self.pad_seq_len_divisible, self.pad_token_id)
        out["num_tokens"] = torch.tensor([len(ex["input_ids"]) for ex in batch], dtype=torch.int64)
        return out

    def __repr__(self) -> str:
        return (f"SFTCollator(pad_token_id={self.pad_token_id}, "
                f"pad_seq_len_divisible={self.pad_seq_len_divisible})")
