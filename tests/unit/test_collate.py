import pickle

import pytest
import torch

from nemo_pp.datasets.utils import SFTCollator, default_collater


def _batch():
    return [
        {"input_ids": [5, 6, 7], "labels": [-100, 7, 8]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 4, 5, 9]},
    ]


def test_pads_to_batch_max_with_right_values():
    out = default_collater(_batch(), pad_token_id=2)
    assert set(out) == {"input_ids", "labels"}
    assert out["input_ids"].tolist() == [[5, 6, 7, 2, 2], [1, 2, 3, 4, 5]]
    assert out["labels"].tolist() == [[-100, 7, 8, -100, -100], [-100, -100, 4, 5, 9]]
    assert out["input_ids"].dtype == torch.int64
    assert out["labels"].dtype == torch.int64


@pytest.mark.parametrize("divisible, expect", [(None, 5), (1, 5), (4, 8), (5, 5), (8, 8), (16, 16)])
def test_divisible_rounds_up(divisible, expect):
    out = default_collater(_batch(), pad_seq_len_divisible=divisible)
    assert out["input_ids"].shape == (2, expect)
    assert out["labels"].shape == (2, expect)
    assert (out["labels"][:, 5:] == -100).all()
    assert (out["input_ids"][:, 5:] == 0).all()


def test_other_list_keys_padded_with_zero():
    batch = [dict(ex, attention_mask=[1] * len(ex["input_ids"])) for ex in _batch()]
    out = default_collater(batch, pad_seq_len_divisible=4)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert out["attention_mask"].dtype == torch.int64


def test_accepts_1d_tensors():
    batch = [{k: torch.tensor(v) for k, v in ex.items()} for ex in _batch()]
    out = default_collater(batch, pad_token_id=9)
    assert out["input_ids"].tolist()[0] == [5, 6, 7, 9, 9]


def test_non_list_key_raises():
    batch = [dict(ex, text="hello") for ex in _batch()]
    with pytest.raises(ValueError, match="'text'.*list of ints.*str"):
        default_collater(batch)


def test_mismatched_keys_and_empty_batch_raise():
    b = _batch()
    b[1]["extra"] = [1]
    with pytest.raises(ValueError, match="keys"):
        default_collater(b)
    with pytest.raises(ValueError, match="empty"):
        default_collater([])


def test_sft_collator_is_picklable_and_matches_function():
    col = SFTCollator(pad_token_id=3, pad_seq_len_divisible=4)
    col2 = pickle.loads(pickle.dumps(col))
    a, b = col(_batch()), col2(_batch())
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert a["input_ids"].tolist() == default_collater(_batch(), 4, 3)["input_ids"].tolist()
    assert "pad_token_id=3" in repr(col)


def test_sft_collator_in_dataloader():
    loader = torch.utils.data.DataLoader(_batch() * 2, batch_size=2, collate_fn=SFTCollator(0, 8))
    shapes = [tuple(b["input_ids"].shape) for b in loader]
    assert shapes == [(2, 8), (2, 8)]


def test_packing_is_greedy_in_order_with_restarting_positions():
    from nemo_pp.datasets.packed_sequence import PackedSequenceDataset

    samples = [{"input_ids": list(range(n)), "labels": [-100] + list(range(1, n))} for n in (5, 4, 8, 3, 12)]
    packed = PackedSequenceDataset(samples, 10)
    assert packed.packs == [[0, 1], [2], [3], [4]]  # 5+4 fit; 8 alone (8+3 > 10); 12 is cut to 10
    assert packed[0] == {"input_ids": [0, 1, 2, 3, 4, 0, 1, 2, 3], "labels": [-100, 1, 2, 3, 4, -100, 1, 2, 3],
                         "position_ids": [0, 1, 2, 3, 4, 0, 1, 2, 3]}
    assert packed[3]["position_ids"] == list(range(10))
    batch = SFTCollator(pad_token_id=7, pad_seq_len_divisible=10)([packed[0], packed[1]])
    assert batch["input_ids"].shape == (2, 10) and batch["num_tokens"].tolist() == [9, 8]
    assert batch["position_ids"][1].tolist() == list(range(8)) + [0, 0]
    with pytest.raises(ValueError, match="split_across_pack: true is not supported"):
        PackedSequenceDataset(samples, 10, split_across_pack=True)
