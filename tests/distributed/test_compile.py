"""Regional compile (``compile.enabled``): each decoder layer's forward compiled by
inductor trains exactly as the eager unsplit model, through batches of two lengths (one
recompile with a symbolic sequence length, none after), at pp 2 and with FSDP2."""

from __future__ import annotations

import copy

import pytest

from tests.distributed.launcher import run_ranks
from tests.helpers import LR, MAX_NORM, assert_grads_match, assert_weights_match, reference_training, training_batches
from tests.tiny_models import tiny_model


def _run(rank, world, pp):
    import torch._dynamo

    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine
    from tests.helpers import sum_ce

    torch._dynamo.reset()
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp))
    dp, dp_rank = mesh.sizes.dp, mesh.dp_rank
    ref = tiny_model("llama", True, layers=4)
    model = copy.deepcopy(ref)
    steps = training_batches(3, 1, dp, 2, (16, 24, 32), ref.config.vocab_size)
    expected = reference_training(ref, steps, LR)
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b" if pp > 1 else "gpipe", pp_batch_size=2,
                      device=torch.device("cpu")).build(
        model, loss_fn=sum_ce, parallelize_fn=parallelize_chain(mesh, compile_kwargs={"backend": "inductor"}))
    from nemo_pp.models.module_tree import decoder_layers

    assert all(getattr(layer.forward, "_nemo_pp_compiled", False) for part in ap.parts for layer in decoder_layers(part))
    opts = [torch.optim.AdamW(part.parameters(), lr=LR, weight_decay=0.1) for part in ap.parts]
    engine = TrainEngine(ap, torch.device("cpu"), dp_group=mesh.dp.get_group() if dp > 1 else None,
                         max_grad_norm=MAX_NORM)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], [], [])
        assert abs(out["loss"] - expected[step]["loss"]) <= 1e-5 * expected[step]["loss"], step
        assert_grads_match(ap, expected[step]["grads"], atol=2e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_weights_match(ap, ref)
    # three lengths: static, then symbolic; the third reuses the symbolic graph
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return int(frames)


@pytest.mark.parametrize("world,pp", [(2, 2), (2, 1)], ids=["pp2", "fsdp2"])
def test_compiled_layers_train_like_the_eager_model(world, pp):
    graphs = run_ranks(_run, world, pp, timeout=600)
    assert all(1 <= g <= 2 for g in graphs), graphs  # one static and one dynamic graph, shared by every layer
