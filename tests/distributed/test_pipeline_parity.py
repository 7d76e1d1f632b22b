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
from tests.tiny_models import tiny_model

ATOL = 1e-5


def sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def make_batch(batch_size: int, seq_len: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels[torch.rand(batch_size, seq_len, generator=g) < 0.3] = -100
    return input_ids, labels


def step_once(info, ids, labels) -> list | None:
    """One ``schedule.step`` as every rank calls it; the losses on the last stage."""
    losses = [] if info.has_last_stage else None
    info.schedule.step(*((ids,) if info.has_first_stage else ()),
                       target=labels if info.has_last_stage else None, losses=losses)
    return losses


def reference(model, batches):
    """Loss (sum / tokens) and grads of the unsplit model, accumulated over ``batches``."""
    tokens = sum(int((lb != -100).sum()) for _, lb in batches)
    total = 0.0
    for ids, lb in batches:
        loss = sum_ce(model(input_ids=ids).logits, lb)
        (loss / tokens).backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return total / tokens, grads, tokens


def _run_parity(rank, world, arch, tied, schedule, layers, batch_size, seq_lens, layers_per_stage, pp=None, ap_kwargs=None):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp or world))
    ref_model = tiny_model(arch, tied, layers)
    model = copy.deepcopy(ref_model)
    vocab = ref_model.config.vocab_size
    batches = [make_batch(batch_size, s, vocab, seed=i) for i, s in enumerate(seq_lens)]
    ref_loss, ref_grads, tokens = reference(ref_model, batches)

    ap = AutoPipeline(
        world_mesh=mesh.world, pp_schedule=schedule, pp_microbatch_size=1, pp_batch_size=batch_size,
        layers_per_stage=layers_per_stage, device=torch.device("cpu"), **(ap_kwargs or {}),
    ).build(model, loss_fn=sum_ce)
    info = ap.info
    forwards = [0]
    for part in ap.parts:
        part.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    total = 0.0
    for ids, lb in batches:
        ap.update_seq_len(ids.shape[1])
        losses = step_once(info, ids, lb)
        if losses is not None:
            total += float(sum(l.detach() for l in losses))
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()

    checked = 0
    for part in ap.parts:
        for name, p in part.named_parameters():
            assert p.grad is not None, f"{name} has no grad"
            torch.testing.assert_close(p.grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            checked += 1
    if info.has_last_stage:
        assert abs(total / tokens - ref_loss) < ATOL, (total / tokens, ref_loss)
    expected_forwards = len(ap.parts) * len(batches) * batch_size  # one per microbatch, no probe forward
    assert forwards[0] == expected_forwards, (forwards[0], expected_forwards)
    return checked


CASES = [
    # arch, tied, schedule, layers, batch, seq_lens, layers_per_stage
    ("llama", False, "gpipe", 4, 4, (16,), None),
    ("llama", True, "1f1b", 4, 4, (16,), None),
    ("qwen2", False, "1f1b", 5, 4, (16,), None),
    ("qwen2", True, "gpipe", 4, 2, (16,), None),
    ("llama", True, "interleaved_1f1b", 4, 4, (16,), None),
    ("qwen2", False, "Interleaved1F1B", 8, 4, (16,), 2),
]


@pytest.mark.parametrize("arch,tied,schedule,layers,batch,seq_lens,lps", CASES)
def test_pp2_matches_unsplit_model(arch, tied, schedule, layers, batch, seq_lens, lps):
    checked = run_ranks(_run_parity, 2, arch, tied, schedule, layers, batch, seq_lens, lps)
    assert sum(checked) > 0


MULTI_STAGE = ["Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


@pytest.mark.parametrize("schedule", MULTI_STAGE)
def test_every_multi_stage_schedule_at_pp2(schedule):
    run_ranks(_run_parity, 2, "llama", True, schedule, 4, 4, (16,), None)


@pytest.mark.parametrize("schedule,layers,batch", [("1f1b", 4, 4), ("interleaved_1f1b", 8, 4), ("zbv", 8, 8)])
def test_pp4_matches_unsplit_model(schedule, layers, batch):
    run_ranks(_run_parity, 4, "qwen2", True, schedule, layers, batch, (16,), None, timeout=240)


@pytest.mark.parametrize("schedule", ["1f1b"] + MULTI_STAGE)
def test_seq_len_change_with_accumulation_matches_reference(schedule):
    """16 -> 32 -> 8 tokens, grads accumulated across the changes, no extra forward."""
    run_ranks(_run_parity, 2, "llama", True, schedule, 4, 4, (16, 32, 8), None)


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
