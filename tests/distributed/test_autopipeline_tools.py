"""AutoPipeline's inspection and gradient tools on real gloo ranks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import make_batch, step_once, sum_ce
from tests.tiny_models import tiny_model


def _build(world, schedule, model, batch=4, **kw):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    return AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_batch_size=batch, device=torch.device("cpu"), **kw).build(
        model, loss_fn=sum_ce
    )


def _clip(rank, world, norm_type):
    ref = tiny_model("llama", True, 4)
    ap = _build(world, "interleaved_1f1b", copy.deepcopy(ref))
    ids, lb = make_batch(4, 16, 128, 0)
    sum_ce(ref(input_ids=ids).logits, lb).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1, norm_type=norm_type))
    ap.update_seq_len(16)
    info = ap.info
    step_once(info, ids, lb)
    ap.sync_tied_grads()
    norm = float(ap.clip_grad_norm(0.1, norm_type=norm_type))
    assert math.isclose(norm, ref_norm, rel_tol=1e-5), (norm, ref_norm)
    ref_grads = dict(ref.named_parameters(remove_duplicate=False))
    for part in ap.parts:  # clipped like the reference
        for name, p in part.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-4)
    return norm


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_equals_unsplit_model(norm_type):
    norms = run_ranks(_clip, 2, norm_type)
    assert norms[0] == norms[1]


def _inspect(rank, world, png):
    model = tiny_model("llama", True, 8)
    ap = _build(world, "interleaved_1f1b", model, batch=4, pp_seq_len=16)
    modules = ap.list_stage_modules()
    assert len(modules) == 4 and modules[0][0] == "model.embed_tokens" and "lm_head" in modules[3]
    counts = ap.get_stage_param_counts()
    assert len(counts) == 4 and ap.get_total_param_count() == sum(counts)
    table = ap.pretty_print_stages(max_modules_per_stage=2)
    # GLOBAL stage indices with their owner: loop placement, rank 0 holds 0 and 2
    assert "stage 2 (pp_rank 0)" in table and "stage 3 (pp_rank 1)" in table and "model.layers.0-1" in table
    assert "microbatches=4" in ap.debug_summary()
    # pp_seq_len: shapes precomputed at build, the first step runs no probe forward
    forwards = [0]
    for part in ap.parts:
        part.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    ids, lb = make_batch(4, 16, 128, 0)
    info = ap.info
    step_once(info, ids, lb)
    assert forwards[0] == 2 * 4
    if rank == 0:
        ap.visualize_current_schedule(png)
    return True


def test_inspection_tools_and_precomputed_shapes(tmp_path):
    png = str(tmp_path / "schedule.png")
    run_ranks(_inspect, 2, png)
    assert open(png, "rb").read(4) == b"\x89PNG"
