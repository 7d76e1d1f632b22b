"""The memory plan's receive buffers are the ones torch's pipeline stages really allocate
(one per microbatch and direction, kept after the step), and under 1F1B the pooled buffers
(``pool_recv_buffers``: as many as a stage holds microbatches, plus one) train exactly as
one buffer per microbatch."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import make_batch, step_once
from tests.tiny_models import tiny_model


def _buffer_bytes(stages) -> int:
    """Bytes of the distinct storages behind the stages' receive buffers."""
    storages = {}
    for stage in stages:
        for group in list(stage.args_recv_info.values()) + list(stage.grad_recv_info.values()):
            for r in group:
                buf = getattr(r, "buffer", None)
                if buf is not None:
                    storages[buf.untyped_storage().data_ptr()] = buf.untyped_storage().nbytes()
    return sum(storages.values())


def _train(world, schedule, pool):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.planning.memory import memory_plan
    from tests.helpers import sum_ce

    model = tiny_model("llama", False, 4)
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    import dataclasses

    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_microbatch_size=1, pp_batch_size=8,
                      device=torch.device("cpu"))
    plan = dataclasses.replace(ap.make_plan(model), pool_recv_buffers=pool)
    ap.build(copy.deepcopy(model), loss_fn=sum_ce, plan=plan)
    losses = []
    for seed, seq in enumerate((16, 16, 24)):  # a length change rebuilds (and pools again) the buffers
        ids, labels = make_batch(8, seq, model.config.vocab_size, seed=seed)
        ap.update_seq_len(seq)
        out = step_once(ap.info, ids, labels)
        losses.append([float(l) for l in out] if out is not None else None)
    planned = memory_plan(model.to("meta"), ap.plan, seq_len=24)[mesh.pp_rank].recv_buffer_bytes
    allocated = _buffer_bytes(ap.info.stages)
    assert allocated == planned, (allocated, planned)
    grads = {n: p.grad.clone() for part in ap.parts for n, p in part.named_parameters()}
    return losses, grads, allocated


def _run(rank, world, schedule):
    """Pooled and one-buffer-per-microbatch runs of the same batches: equal to the bit."""
    loss_a, grads_a, bytes_a = _train(world, schedule, True)
    loss_b, grads_b, bytes_b = _train(world, schedule, False)
    assert loss_a == loss_b
    for name in grads_b:
        assert torch.equal(grads_a[name], grads_b[name]), name
    return bytes_a, bytes_b


@pytest.mark.parametrize("world,schedule", [(2, "1f1b"), (4, "1f1b"), (2, "interleaved_1f1b")])
def test_receive_buffers_planned_and_pooled_exactly(world, schedule):
    for pooled, plain in run_ranks(_run, world, schedule):
        if schedule == "1f1b":
            assert pooled < plain  # 8 microbatches share fewer buffers
        else:
            assert pooled == plain  # pooled only under a one-stage-per-rank schedule
