"""Context parallelism under the pipeline, with FSDP2, HSDP and TP: losses, gradients and
weights after AdamW steps equal the unsplit model trained on the same global batches.

The batches change sequence length inside gradient accumulation (16 then 24 tokens), so
the stages' static shapes are re-sized to the new local length mid-step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks
from tests.helpers import (
    FAMILIES,
    LR,
    MAX_NORM,
    Layout,
    assert_grads_match,
    assert_weights_match,
    family_model,
    full_tensor,
    make_batch,
    optimizer_step_keeps_tie,
    reference,
    reference_training,
    sum_ce,
    training_batches,
)
from tests.tiny_models import tiny_model


def _run(rank, world, layout: Layout, attention="allgather", device="cpu", fused_loss=False):
    from nemo_pp.distributed.context_parallel import ContextParallel
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    tp, sp = layout.tp, layout.sequence_parallel
    sizes = resolve_parallel_sizes(world, pp_size=layout.pp, tp_size=tp, cp_size=layout.cp,
                                   dp_replicate_size=layout.dp_replicate)
    device = torch.device(device, rank) if device == "cuda" else torch.device(device)
    mesh = build_device_mesh(device.type, sizes)
    dp, dp_rank = sizes.dp, mesh.dp_rank
    ref = tiny_model(layout.arch, layout.tied, layers=4)
    model = copy.deepcopy(ref)
    unsplit_config = model.config  # what the recipe exports with
    steps = training_batches(2, 2, dp, 4, (16, 24), ref.config.vocab_size)
    with torch.no_grad():  # validation loss of the first step's batches, before any training
        flat = [b for group in steps[0] for b in group]
        ref_val = sum(float(sum_ce(ref(input_ids=b["input_ids"]).logits, b["labels"])) for b in flat)
        ref_val /= sum(int((b["labels"] != -100).sum()) for b in flat)
    expected = reference_training(ref, steps)

    if fused_loss:  # each cp rank's slice of the label tokens, its logits never formed
        from nemo_pp.loss import FusedLinearCrossEntropy

        loss_fn = FusedLinearCrossEntropy(chunk_size=7)
    else:
        loss_fn = sum_ce
    cp = ContextParallel(mesh, attention)  # one object: the stages' attention and the engine's batch slicing, as in the recipe
    # TP at tp > 1, the CP attention, FSDP2 over dp_shard x cp (HSDP: dp_replicate too)
    parallelize = parallelize_chain(mesh, sequence_parallel=sp, cp=cp,
                                    activation_checkpointing=layout.activation_checkpointing)
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=layout.pp_schedule, pp_batch_size=4,
                      device=device, sequence_shards=tp if sp else 1).build(model, loss_fn=loss_fn, parallelize_fn=parallelize)
    # the CP attention really runs (and only on the stages' configs, not the unsplit model's)
    assert all(part.config._attn_implementation == f"nemo_pp_cp_{attention}" for part in ap.parts)
    assert unsplit_config._attn_implementation == "sdpa"
    opts = [torch.optim.AdamW(p.parameters(), lr=LR, weight_decay=0.1) for p in ap.parts]
    engine = TrainEngine(ap, device, dp_group=mesh.dp.get_group() if dp > 1 else None,
                         max_grad_norm=MAX_NORM, cp=cp)
    val = engine.validation_loss(steps[0][dp_rank])  # through the same sliced path, no grad
    assert abs(val - ref_val) <= 1e-5 * max(1.0, ref_val), (val, ref_val)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], [], [])  # no optimizer yet: the grads stay to be compared
        loss, grads = expected[step]["loss"], expected[step]["grads"]
        assert abs(out["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, out["loss"], loss)
        assert out["num_label_tokens"] == sum(int((b["labels"] != -100).sum()) for g in per_dp for b in g)
        assert_grads_match(ap, grads)
        optimizer_step_keeps_tie(ap, opts)
    assert_weights_match(ap, ref)
    dist.barrier()
    return True


LAYOUTS = {
    "cp2": Layout(world=2, pp=1, cp=2, arch="llama", tied=True, schedule="gpipe"),
    "cp2-qwen2-ac": Layout(world=2, pp=1, cp=2, arch="qwen2", tied=False, schedule="gpipe", activation_checkpointing=True),
    "pp2-cp2-tied": Layout(world=4, pp=2, cp=2, arch="llama", tied=True, schedule="1f1b"),
    "pp2-cp2-untied-interleaved": Layout(world=4, pp=2, cp=2, arch="llama", tied=False, schedule="interleaved_1f1b"),
    "hsdp2-cp2": Layout(world=4, pp=1, cp=2, arch="qwen2", tied=True, schedule="gpipe", dp_replicate=2),
    "pp2-dp2-cp2": Layout(world=8, pp=2, cp=2, arch="llama", tied=True, schedule="1f1b"),
    "pp2-cp2-tp2": Layout(world=8, pp=2, cp=2, arch="llama", tied=False, schedule="1f1b", tp=2),
    "pp2-cp2-tp2-sp": Layout(world=8, pp=2, cp=2, arch="llama", tied=True, schedule="1f1b", tp=2, sequence_parallel=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_layout_matches_the_unsplit_model(layout):
    run_ranks(_run, LAYOUTS[layout].world, LAYOUTS[layout], timeout=300)


@pytest.mark.parametrize("layout", ["pp2-cp2-tied", "pp2-cp2-tp2-sp"])
def test_context_parallel_with_the_fused_loss_matches_the_unsplit_model(layout):
    run_ranks(_run, LAYOUTS[layout].world, LAYOUTS[layout], "allgather", "cpu", True, timeout=300)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="ring attention is torch's context_parallel: CUDA only, "
                    "2 GPUs (nccl takes one GPU per rank)")
@pytest.mark.parametrize("layout", ["cp2", "pp2-cp2-tied"])
def test_ring_attention_matches_the_unsplit_model_on_cuda(layout):
    """cp_attention: ring (torch's context_parallel over SDPA): the reference runs on the CPU."""
    world = LAYOUTS[layout].world
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_ranks(_run, world, LAYOUTS[layout], "ring", "cuda", timeout=300, backend="nccl")


def _ring_slices(rank, world):
    from nemo_pp.distributed.context_parallel import ContextParallel, shard_batch
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, cp_size=world))
    ids = torch.arange(48).reshape(2, 24)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with ContextParallel(mesh, "ring").sharded(ids, ids + 100) as (local_ids, local_labels, positions):
        assert torch.nn.functional.scaled_dot_product_attention is not sdpa  # routed to ring attention
        expected = shard_batch({"input_ids": ids, "labels": ids + 100}, world, rank)
        assert torch.equal(local_ids, expected["input_ids"]) and torch.equal(local_labels, expected["labels"])
        assert torch.equal(positions, expected["position_ids"])
    assert torch.nn.functional.scaled_dot_product_attention is sdpa and ids.shape == (2, 24)  # restored, input untouched
    return True


def test_ring_path_slices_batches_as_the_allgather_path():
    """What the CPU can check of the ring path: torch's context_parallel cuts the batch into
    the same head + tail chunks as nemo_pp's own split (the SDPA it patches needs CUDA)."""
    run_ranks(_ring_slices, 2)


def _run_family(rank, world, model_type, ep=1):
    from nemo_pp.distributed.context_parallel import ContextParallel
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, cp_size=world, ep_size=ep))
    # HF's own eager attention: windows and soft-capping in the family's code; a cap small
    # enough to bend this tiny model's attention scores (at 5.0 tanh is nearly the identity)
    capped = {"attn_logit_softcapping": 0.5} if model_type == "gemma2" else {}
    ref = family_model(model_type, **capped)
    model = copy.deepcopy(ref)
    batches = [make_batch(4, 16, ref.config.vocab_size, seed=i) for i in range(2)]
    ref_loss, ref_grads, _ = reference(ref, batches)
    cp = ContextParallel(mesh, "allgather")  # one object for the stages and the engine
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="gpipe", pp_batch_size=4, device=torch.device("cpu")).build(
        model, loss_fn=sum_ce, parallelize_fn=parallelize_chain(mesh, cp=cp))  # the CP attention, FSDP2 over the cp ranks
    if ep > 1:  # each cp rank holds E / ep experts
        from nemo_pp.models.moe import expert_modules

        assert all(m.gate_up_proj.to_local().shape[0] == m.num_experts // ep for m in expert_modules(ap.parts[0]))
    engine = TrainEngine(ap, torch.device("cpu"), max_grad_norm=None, cp=cp)
    out = engine.train_step([{"input_ids": ids, "labels": lb} for ids, lb in batches], [], [])
    assert abs(out["loss"] - ref_loss) <= 1e-5 * max(1.0, ref_loss), (out["loss"], ref_loss)
    for name, p in ap.parts[0].named_parameters():
        if ref_grads.get(name) is not None:
            torch.testing.assert_close(full_tensor(p.grad), ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return True


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_context_parallel_family_matches_hf_forward(model_type):
    """cp 2 on every proven family: sliding windows (Mistral, Gemma 2/3, window 8 of 16 tokens),
    attention soft-capping and query scaling (Gemma 2), per-layer rotary bases (Gemma 3), MoE."""
    run_ranks(_run_family, 2, model_type, timeout=180)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_expert_parallel_over_the_cp_ranks_matches_hf_forward(model_type):
    """ep 2 taken from the 2 cp ranks: each routes the tokens of its sequence slices and sends
    them to the rank holding their experts (the load-balancing loss is refused under cp)."""
    run_ranks(_run_family, 2, model_type, 2, timeout=180)
