"""Pipelined loss and every gradient equal the unsplit model's on the same batches.

Ranks are forked from pytest (real gloo process groups). Each rank builds the same
tiny random model from a seed, computes the single-process reference itself, then
runs the pipeline and compares.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import ATOL, ParityCase, make_batch, reference, run_parity, step_once, sum_ce
from tests.tiny_models import tiny_model

CASES = [
    ParityCase(arch="llama", tied=False, schedule="gpipe", layers=4, batch=4, seq_lens=(16,)),
    ParityCase(arch="llama", tied=True, schedule="1f1b", layers=4, batch=4, seq_lens=(16,)),
    ParityCase(arch="qwen2", tied=False, schedule="1f1b", layers=5, batch=4, seq_lens=(16,)),
    ParityCase(arch="qwen2", tied=True, schedule="gpipe", layers=4, batch=2, seq_lens=(16,)),
    ParityCase(arch="llama", tied=True, schedule="interleaved_1f1b", layers=4, batch=4, seq_lens=(16,)),
    ParityCase(arch="qwen2", tied=False, schedule="Interleaved1F1B", layers=8, batch=4, seq_lens=(16,), layers_per_stage=2),
]


def _case_id(i: int, c: ParityCase) -> str:
    """The ids pytest gave these cases as positional tuples (``seq_lens<i>``, the last field ``lps``)."""
    return f"{c.arch}-{c.tied}-{c.schedule}-{c.layers}-{c.batch}-seq_lens{i}-{c.layers_per_stage}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(i, c) for i, c in enumerate(CASES)])
def test_pp2_matches_unsplit_model(case):
    checked = run_ranks(run_parity, 2, case)
    assert sum(checked) > 0


MULTI_STAGE = ["Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


@pytest.mark.parametrize("schedule", MULTI_STAGE)
def test_every_multi_stage_schedule_at_pp2(schedule):
    run_ranks(run_parity, 2, ParityCase(arch="llama", tied=True, schedule=schedule, layers=4, batch=4, seq_lens=(16,)))


@pytest.mark.parametrize("schedule,layers,batch", [("1f1b", 4, 4), ("interleaved_1f1b", 8, 4), ("zbv", 8, 8)])
def test_pp4_matches_unsplit_model(schedule, layers, batch):
    run_ranks(run_parity, 4, ParityCase(arch="qwen2", tied=True, schedule=schedule, layers=layers, batch=batch, seq_lens=(16,)),
              timeout=240)


@pytest.mark.parametrize("schedule", ["1f1b"] + MULTI_STAGE)
def test_seq_len_change_with_accumulation_matches_reference(schedule):
    """16 -> 32 -> 8 tokens, grads accumulated across the changes, no extra forward."""
    run_ranks(run_parity, 2, ParityCase(arch="llama", tied=True, schedule=schedule, layers=4, batch=4, seq_lens=(16, 32, 8)))


def _run_csv(rank, world, csv_path):
    """A CSV schedule through AutoPipeline: stage count and placement come from the file."""
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ref = tiny_model("llama", True, 4)
    model = copy.deepcopy(ref)
    batches = [make_batch(4, 16, ref.config.vocab_size, seed=0)]
    ref_loss, ref_grads, tokens = reference(ref, batches)
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=None, pp_schedule_csv=csv_path, pp_batch_size=4,
                      device=torch.device("cpu")).build(model, loss_fn=sum_ce)
    ids, lb = batches[0]
    ap.update_seq_len(16)
    info = ap.info
    losses = step_once(info, ids, lb)
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()
    for part in ap.parts:
        for name, p in part.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], atol=ATOL, rtol=1e-4)
    if losses:
        assert abs(float(sum(l.detach() for l in losses)) / tokens - ref_loss) < ATOL
    return sorted(s.stage_index for s in info.stages)


def test_csv_schedule_shipped_example():
    held = run_ranks(_run_csv, 2, "configs/schedules/1f1b_pp2_mb4.csv")
    assert held == [[0], [1]]


def test_csv_schedule_with_stage_0_on_pp_rank_1():
    """The tied-embedding pair is taken from the plan's owners, not assumed to start at pp rank 0."""
    held = run_ranks(_run_csv, 2, "configs/schedules/1f1b_pp2_mb4_swapped.csv")
    assert held == [[1], [0]]


def test_csv_schedule_with_two_stages_per_rank(tmp_path):
    csv = tmp_path / "looped.csv"
    fwd = lambda s: [f"{s}F{m}" for m in range(4)]  # noqa: E731
    bwd = lambda s: [f"{s}B{m}" for m in range(4)]  # noqa: E731
    csv.write_text(",".join(fwd(0) + fwd(2) + bwd(2) + bwd(0)) + "\n" + ",".join(fwd(1) + fwd(3) + bwd(3) + bwd(1)) + "\n")
    assert run_ranks(_run_csv, 2, str(csv)) == [[0, 2], [1, 3]]
