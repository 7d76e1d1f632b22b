"""The context-parallel sequence layout and its attention mask, in one process."""

from __future__ import annotations

import pytest
import torch

from nemo_pp.distributed.context_parallel import _allowed, shard_batch, zigzag_positions
from nemo_pp.planning.checks import resolve_cp_attention


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_zigzag_layout_is_torchs_head_tail_split_and_covers_every_position_once(cp):
    seq = 8 * cp
    per_rank = [zigzag_positions(seq, cp, r) for r in range(cp)]
    assert per_rank[0][: seq // (2 * cp)].tolist() == list(range(seq // (2 * cp)))  # rank 0: the first chunk ...
    assert per_rank[0][-1].item() == seq - 1  # ... and the last
    assert sorted(torch.cat(per_rank).tolist()) == list(range(seq))
    # torch's context_parallel load balancer slices the same positions in the same order (the ring path relies on it)
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

    torch_order = _HeadTailLoadBalancer(seq, cp, "cpu")._generate_indices()[0]
    assert torch.equal(torch_order, torch.cat(per_rank))


@pytest.mark.parametrize("cp", [2, 4])
def test_every_rank_gets_the_same_causal_attention_work(cp):
    """The point of the head + mirrored-tail split: equal (query, key) pairs per rank."""
    seq = 16 * cp
    work = [int(_allowed(seq // cp, cp, r, None, torch.device("cpu")).sum()) for r in range(cp)]
    assert len(set(work)) == 1 and sum(work) == seq * (seq + 1) // 2
    # a sliding window keeps only keys within it, still causal
    window = _allowed(seq // cp, cp, 0, 4, torch.device("cpu"))
    assert int(window.sum(dim=1).max()) == 4


def test_mask_follows_global_positions():
    allowed = _allowed(4, 2, 1, None, torch.device("cpu"))  # rank 1 of S=8 holds positions 2, 3, 4, 5
    keys = torch.cat([zigzag_positions(8, 2, r) for r in range(2)])  # gathered in rank order: 0 1 6 7 2 3 4 5
    for row, q in enumerate([2, 3, 4, 5]):
        assert allowed[row].tolist() == [int(k) <= q for k in keys]


def test_shard_batch_slices_ids_labels_and_gives_positions():
    ids = torch.arange(24).reshape(2, 12)
    out = shard_batch({"input_ids": ids, "labels": ids + 100, "num_tokens": torch.tensor([12, 9])}, 2, 1)
    assert out["position_ids"].tolist() == [[3, 4, 5, 6, 7, 8]] * 2
    assert torch.equal(out["input_ids"], ids[:, 3:9]) and torch.equal(out["labels"], ids[:, 3:9] + 100)
    assert out["num_tokens"].tolist() == [12, 9]


def test_shard_batch_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="dataloader.pad_seq_len_divisible to a multiple of 4"):
        shard_batch({"input_ids": torch.zeros(1, 10, dtype=torch.long), "labels": torch.zeros(1, 10)}, 2, 0)
    with pytest.raises(ValueError, match="packed_sequence"):
        shard_batch({"input_ids": torch.zeros(1, 8), "labels": torch.zeros(1, 8), "position_ids": torch.zeros(1, 8)}, 2, 0)


def test_cp_attention_resolution():
    assert resolve_cp_attention("auto", on_cuda=False) == "allgather"
    assert resolve_cp_attention("auto", on_cuda=True) == "ring"
    assert resolve_cp_attention("allgather", on_cuda=True) == "allgather"
    with pytest.raises(ValueError, match="distributed.cp_attention: allgather"):
        resolve_cp_attention("ring", on_cuda=False)
