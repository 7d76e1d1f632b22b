"""Meta-device build with per-stage loading: every rank allocates and reads only its own
stages, and the result is bit-identical to loading the whole model and splitting it."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import ATOL, make_batch, reference, step_once, sum_ce
from tests.tiny_models import tiny_model


def _run_meta(rank, world, ckpt, pp, schedule):
    from transformers import AutoModelForCausalLM

    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.models import NeMoAutoModelForCausalLM
    from nemo_pp.models.loading import SafetensorsCheckpoint
    from nemo_pp.models.module_tree import is_tied
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.planning.schedules import SPLIT_BACKWARD_SCHEDULES, canonical_schedule_name

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp))
    eager = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model = NeMoAutoModelForCausalLM.from_pretrained(ckpt, load_weights=False)
    assert all(p.is_meta for p in model.parameters())
    weights = SafetensorsCheckpoint.for_model(ckpt, model)
    split_backward = canonical_schedule_name(schedule) in SPLIT_BACKWARD_SCHEDULES  # FSDP2 must not reshard then
    fsdp = parallelize_chain(mesh, reshard_after_forward=not split_backward)  # FSDP2 at dp > 1, else None
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_batch_size=4, device=torch.device("cpu")).build(
        model, loss_fn=sum_ce, parallelize_fn=fsdp, weights=weights)

    ref = dict(eager.named_parameters(remove_duplicate=False))
    ref_buffers = dict(eager.named_buffers())
    for part in ap.parts:
        for name, p in part.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            assert torch.equal(full.detach(), ref[name].detach()), name  # bit-identical after load
        for name, b in part.named_buffers():
            assert torch.equal(b, ref_buffers[name]), name  # rotary inv_freq recomputed, not garbage
    if ap.tied_embeddings is None and is_tied(eager) and len(ap.parts) == 1 and ap.info.has_first_stage \
            and ap.info.has_last_stage:
        part = ap.parts[0]
        assert part.lm_head.weight is part.model.embed_tokens.weight  # one stage keeps the tie

    batch = make_batch(4, 16, eager.config.vocab_size, seed=3)
    ref_loss, ref_grads, tokens = reference(eager, [batch])
    ap.update_seq_len(16)
    losses = step_once(ap.info, *batch)
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()
    for part in ap.parts:
        for name, p in part.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            if mesh.sizes.dp > 1:
                grad = grad / mesh.sizes.dp  # every dp rank ran the same batch: FSDP summed them
            torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if losses:
        assert abs(float(sum(l.detach() for l in losses)) / tokens - ref_loss) < ATOL
    return sorted(weights.files_read)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_meta_build_pp2_equals_eager_load_and_reads_only_its_shards(tmp_path, tied, sharded):
    ckpt = tmp_path / "ckpt"
    tiny_model("llama", tied, layers=4).save_pretrained(ckpt, max_shard_size="20KB" if sharded else "10GB")
    read = run_ranks(_run_meta, 2, str(ckpt), 2, "1f1b")
    all_files = {p.name for p in ckpt.glob("*.safetensors")}
    if sharded:
        assert len(all_files) > 2
        for files in read:  # each rank opens a strict subset of the shards
            assert set(files) < all_files, (files, all_files)
        assert set(read[0]) != set(read[1])
    else:
        assert read == [["model.safetensors"], ["model.safetensors"]]


@pytest.mark.parametrize("world,pp,schedule", [(1, 1, "1f1b"), (4, 2, "zbv"), (2, 1, "gpipe")])
def test_meta_build_at_pp1_with_v_schedule_and_under_fsdp2(tmp_path, world, pp, schedule):
    ckpt = tmp_path / "ckpt"
    tiny_model("llama", True, layers=4).save_pretrained(ckpt, max_shard_size="20KB")
    run_ranks(_run_meta, world, str(ckpt), pp, schedule, timeout=240)


def test_checkpoint_that_misses_a_tensor_is_named_before_any_read_and_extra_ones_are_left(tmp_path):
    from safetensors.torch import load_file, save_file

    from nemo_pp.models import NeMoAutoModelForCausalLM
    from nemo_pp.models.loading import SafetensorsCheckpoint

    ckpt = tmp_path / "ckpt"
    tiny_model("llama", False, layers=2).save_pretrained(ckpt)
    model = NeMoAutoModelForCausalLM.from_pretrained(ckpt, load_weights=False)
    SafetensorsCheckpoint(ckpt).check_covers(model)
    state = load_file(ckpt / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.mlp\.up_proj"):
        SafetensorsCheckpoint(ckpt).check_covers(model)
    del state["model.layers.7.mlp.up_proj.weight"]
    state["model.rotary_emb.inv_freq"] = torch.zeros(4)  # as older checkpoints carry: left unread
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert SafetensorsCheckpoint(ckpt).check_covers(model) == ["model.rotary_emb.inv_freq"]
    from nemo_pp.models.loading import materialize

    materialize(model, torch.device("cpu"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(1,\)"):
        SafetensorsCheckpoint(ckpt).load_into(model)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no 'model.layers.1.mlp.up_proj.weight'"):
        SafetensorsCheckpoint(ckpt).load_into(model)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        SafetensorsCheckpoint(tmp_path)
