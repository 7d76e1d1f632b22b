"""Tensor parallelism (and HSDP) under the pipeline: losses, gradients, weights after AdamW
steps and the consolidated export equal the unsplit model trained on the same global batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks
from tests.helpers import (
    LR,
    MAX_NORM,
    Layout,
    assert_grads_match,
    assert_weights_match,
    optimizer_step_keeps_tie,
    reference_training,
    sum_ce,
    training_batches,
)
from tests.tiny_models import tiny_model


def _run(rank, world, layout: Layout, export_dir, sp=False):
    from nemo_pp.checkpoint.hf_export import save_consolidated_hf
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    pp, tp, arch, tied = layout.pp, layout.tp, layout.arch, layout.tied
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp, tp_size=tp, dp_replicate_size=layout.dp_replicate))
    dp, dp_rank = mesh.sizes.dp, mesh.dp_rank
    if arch in ("llama", "qwen2"):
        ref = tiny_model(arch, tied, layers=4)
    else:  # a matrix family (tests/helpers.py FAMILIES)
        from tests.helpers import family_model

        ref = family_model(arch, tie_word_embeddings=tied)
    model = copy.deepcopy(ref)
    steps = training_batches(2, 2, dp, 4, (16, 24), ref.config.vocab_size)
    # Qwen3's q/k norms rescale each head to unit RMS, which turns the tp sums' rounding into
    # 2e-6 on a few 1e-4-sized gradients (dropping the norms' all-reduce misses by 4e-4), and
    # Adam turns those into lr-sized updates of near-zero-gradient weights: lr / 10 there
    lr = LR / 10 if arch == "qwen3" else LR
    expected = reference_training(ref, steps, lr)

    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=layout.pp_schedule, pp_batch_size=4,
                      device=torch.device("cpu"), sequence_shards=tp if sp else 1).build(
        model, loss_fn=sum_ce, parallelize_fn=parallelize_chain(mesh, sequence_parallel=sp))  # TP at tp > 1, FSDP2 at dp > 1
    if tp > 1:  # really sharded: some parameter is a DTensor over the tp axis
        assert any("tp" in (getattr(p, "device_mesh", None) and p.device_mesh.mesh_dim_names or ())
                   for part in ap.parts for p in part.parameters())
    if sp:  # norms compute on sequence shards: their weights became (replicated) DTensors
        assert ap.plan.stage.sequence_shards == tp
        from nemo_pp.models.module_tree import decoder_layers

        assert all(hasattr(layer.input_layernorm.weight, "placements") for part in ap.parts for layer in decoder_layers(part))
    opts = [torch.optim.AdamW(p.parameters(), lr=lr, weight_decay=0.1) for p in ap.parts]
    engine = TrainEngine(ap, torch.device("cpu"), dp_group=mesh.dp.get_group() if dp > 1 else None, max_grad_norm=MAX_NORM)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], [], [])  # no optimizer: the grads stay to be compared
        loss, grads = expected[step]["loss"], expected[step]["grads"]
        assert abs(out["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, out["loss"], loss)
        assert_grads_match(ap, grads, atol=5e-6 if arch == "qwen3" else 1e-6)  # Qwen3: see lr above
        optimizer_step_keeps_tie(ap, opts)
    assert_weights_match(ap, ref)

    save_consolidated_hf(export_dir, ap.parts, ref.config, tied=tied, pp_rank=mesh.pp_rank, pp_size=pp,
                         is_writer=mesh.writes_stage_files)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
        for name, tensor in loaded.state_dict().items():
            torch.testing.assert_close(tensor, ref.state_dict()[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    dist.barrier()
    return True


LAYOUTS = {
    "tp2": Layout(world=2, pp=1, tp=2, dp_replicate=1, arch="llama", tied=True),
    "pp2-tp2-tied": Layout(world=4, pp=2, tp=2, dp_replicate=1, arch="llama", tied=True),
    "pp2-tp2-qwen2": Layout(world=4, pp=2, tp=2, dp_replicate=1, arch="qwen2", tied=False),
    "pp2-dp2-tp2": Layout(world=8, pp=2, tp=2, dp_replicate=1, arch="llama", tied=True),
    "pp2-hsdp2x2": Layout(world=8, pp=2, tp=1, dp_replicate=2, arch="qwen2", tied=True),
    # HSDP x TP: 3D DTensors (dp_replicate, dp_shard, tp) through the one-stage pipeline
    "hsdp2x2-tp2": Layout(world=8, pp=1, tp=2, dp_replicate=2, arch="llama", tied=False),
    # per-head q/k norms ('replicated_with_grad_allreduce'): Qwen3 normalises [B, S, heads, D],
    # Gemma 3 [B, heads, S, D]
    "pp2-tp2-qwen3": Layout(world=4, pp=2, tp=2, dp_replicate=1, arch="qwen3", tied=False),
    "tp2-gemma3": Layout(world=2, pp=1, tp=2, dp_replicate=1, arch="gemma3_text", tied=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_the_unsplit_model(tmp_path, layout):
    run_ranks(_run, LAYOUTS[layout].world, LAYOUTS[layout], str(tmp_path / "export"), timeout=300)


SP_LAYOUTS = ["tp2", "pp2-tp2-tied", "pp2-tp2-qwen2", "pp2-dp2-tp2"]


@pytest.mark.parametrize("layout", SP_LAYOUTS)
def test_sequence_parallel_layout_matches_the_unsplit_model(tmp_path, layout):
    """The same, with hidden states as [B, S/tp, H] sequence shards between layers and stages."""
    run_ranks(_run, LAYOUTS[layout].world, LAYOUTS[layout], str(tmp_path / "export"), True, timeout=300)
