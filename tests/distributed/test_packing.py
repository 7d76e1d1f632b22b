"""Packed sequences through a 2-stage pipeline: the loss and every gradient of 8 samples
packed into 4 rows equal those of the same samples unpacked (padded, 2 accumulated batches)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import sum_ce
from tests.tiny_models import tiny_model

LENGTHS = (10, 20, 12, 18, 15, 16, 9, 22)  # greedy into rows of 32: (10, 20) (12, 18) (15, 16) (9, 22)
PACK = 32


def _samples(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.3] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def _run(rank, world, schedule, with_positions):
    from nemo_pp.datasets.packed_sequence import PackedSequenceDataset
    from nemo_pp.datasets.utils import SFTCollator
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=2))
    base = tiny_model("llama", True, layers=4)
    samples = _samples(base.config.vocab_size)
    packed = PackedSequenceDataset(samples, PACK)
    assert [len(p) for p in packed.packs] == [2, 2, 2, 2]
    collate = SFTCollator(pad_token_id=0, pad_seq_len_divisible=PACK)
    packed_batch = collate([packed[i] for i in range(4)])
    assert packed_batch["input_ids"].shape == (4, PACK)
    assert packed_batch["position_ids"][0].tolist()[:31] == list(range(10)) + list(range(20)) + [0]
    if not with_positions:
        del packed_batch["position_ids"]  # the check that positions (and the mask they make) matter
    unpacked = [SFTCollator(0, 8)(samples[:4]), SFTCollator(0, 8)(samples[4:])]

    results = []
    for batches in (unpacked, [packed_batch]):
        ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_batch_size=4,
                          device=torch.device("cpu")).build(copy.deepcopy(base), loss_fn=sum_ce)
        out = TrainEngine(ap, torch.device("cpu"), max_grad_norm=None).train_step(batches, [], [])
        grads = {n: p.grad.clone() for part in ap.parts for n, p in part.named_parameters()}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert a["num_label_tokens"] == b["num_label_tokens"] and a["nonpad_tokens"] == b["nonpad_tokens"] == sum(LENGTHS)
    if not with_positions:
        assert abs(a["loss"] - b["loss"]) > 1e-3  # samples attending to each other change the loss
        return True
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["loss"], b["loss"])
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return True


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_packed_rows_match_the_samples_unpacked(schedule):
    run_ranks(_run, 2, schedule, True)


def test_without_positions_the_samples_would_see_each_other():
    run_ranks(_run, 2, "gpipe", False)
