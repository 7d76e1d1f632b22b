"""The memory plan's receive buffers are the ones torch's pipeline stages really allocate:
one per microbatch and direction, kept after the step."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import make_batch, step_once
from tests.tiny_models import tiny_model


def _run(rank, world, schedule):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.planning.memory import memory_plan
    from tests.helpers import sum_ce

    model = tiny_model("llama", False, 4)
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_microbatch_size=1, pp_batch_size=4,
                      device=torch.device("cpu")).build(copy.deepcopy(model), loss_fn=sum_ce)
    ids, labels = make_batch(4, 16, model.config.vocab_size, seed=0)
    ap.update_seq_len(16)
    step_once(ap.info, ids, labels)
    allocated = 0
    for stage in ap.info.stages:
        infos = list(stage.args_recv_info.values()) + list(stage.grad_recv_info.values())
        allocated += sum(r.buffer.numel() * r.buffer.element_size() for group in infos for r in group
                         if getattr(r, "buffer", None) is not None)
    planned = memory_plan(model.to("meta"), ap.plan, seq_len=16)[mesh.pp_rank].recv_buffer_bytes
    assert allocated == planned, (allocated, planned)
    return allocated


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_planned_receive_buffers_equal_torchs(schedule):
    assert all(b > 0 for b in run_ranks(_run, 2, schedule))
