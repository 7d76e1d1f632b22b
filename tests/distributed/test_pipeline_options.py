"""AutoPipeline options a user sets, each against the unsplit model on real gloo ranks:
forward patching combinations, a dtype given by name, pp_size 1 as a one-stage
pipeline, parallelize_fn signatures, local inspection, the custom-model auto split, and
a data set error reaching every rank."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import (
    ParityCase,
    load_custom_model_example,
    make_batch,
    reference,
    run_parity,
    step_once,
    sum_ce,
)
from tests.tiny_models import tiny_model


def _assert_matches_reference(ap, losses, tokens, ref_grads, ref_loss) -> None:
    """Token-normalised grads (tied copies summed) and loss equal the unsplit model's."""
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()
    for part in ap.parts:
        for name, p in part.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4)
    if losses:
        assert abs(float(sum(l.detach() for l in losses)) / tokens - ref_loss) < 1e-5


@pytest.mark.parametrize(
    "world,pp,inner,outer",
    [
        (2, 2, True, False),  # the last stage runs HF's own causal-LM forward on the patched decoder
        (1, 1, False, True),  # the patched wrapper runs HF's own decoder (whole model, one stage)
        (1, 1, False, False),  # nothing patched: one stage is the HF model itself
        (1, 1, True, True),
    ],
)
def test_patch_combinations_match_unsplit_model(world, pp, inner, outer):
    kwargs = {"patch_inner_model": inner, "patch_causal_lm_model": outer}
    run_ranks(run_parity, world, ParityCase(arch="llama", tied=True, schedule="1f1b", layers=4, batch=4, seq_lens=(16, 8)),
              pp, kwargs)


def test_pp1_is_a_one_stage_pipeline_with_virtual_stages_too():
    """pp_size 1 runs through the same schedule machinery, GPipe and interleaved alike."""
    run_ranks(run_parity, 1, ParityCase(arch="qwen2", tied=False, schedule="gpipe", layers=4, batch=4, seq_lens=(16, 24)), 1)
    run_ranks(run_parity, 1, ParityCase(arch="llama", tied=True, schedule="interleaved_1f1b", layers=4, batch=4,
                                        seq_lens=(16,)), 1)


def _run_bf16(rank, world):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ref = tiny_model("llama", True, 4).to(torch.bfloat16)
    ids, lb = make_batch(4, 16, ref.config.vocab_size, seed=0)
    ref_loss = float(sum_ce(ref(input_ids=ids).logits, lb))
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=4, dtype="bfloat16", pp_seq_len=16,
                      device=torch.device("cpu")).build(copy.deepcopy(ref).float(), loss_fn=sum_ce)
    assert all(p.dtype == torch.bfloat16 for part in ap.parts for p in part.parameters())
    seen = []  # dtypes crossing the stage boundary: what stage 0 sends, what stage 1 receives
    for part in ap.parts:
        part.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype) if args[0].is_floating_point() else None)
        part.register_forward_hook(lambda m, args, out: seen.append(out.dtype) if not hasattr(m, "lm_head") or
                                   m.lm_head is None else None)
    losses = step_once(ap.info, ids, lb)
    assert seen and set(seen) == {torch.bfloat16}, seen
    if losses:
        loss = float(sum(l.detach().float() for l in losses))
        assert abs(loss - ref_loss) < 2e-2 * abs(ref_loss), (loss, ref_loss)
    return True


def test_dtype_by_name_is_applied():
    run_ranks(_run_bf16, 2)


def _run_tools(rank, world):
    import torch.distributed as dist

    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    model = tiny_model("llama", True, 4)
    calls = []

    def reference_style_parallelize(model, world_mesh, moe_mesh, *, dp_axis_names):
        """Written like the reference's examples: no **kwargs, no pp_enabled."""
        calls.append(dp_axis_names)

    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="interleaved_1f1b", pp_batch_size=4,
                      device=torch.device("cpu")).build(model, loss_fn=sum_ce, parallelize_fn=reference_style_parallelize)
    assert calls == [("dp",), ("dp",)]  # once per local stage
    if rank == 0:  # only one rank asks: no collective, so no hang
        counts = ap.get_stage_param_counts()
        modules = ap.list_stage_modules()
        table = ap.pretty_print_stages()
        full = {n: m for n, m in model.named_modules()}
        assert counts == [sum(p.numel() for n in names for p in full[n].parameters()) for names in modules]
        assert ap.get_total_param_count() == sum(counts) == model.num_parameters() + model.lm_head.weight.numel()
        assert "stage 3 (pp_rank 1)" in table and "model.layers.0" in table
    dist.barrier()
    return True


def test_parallelize_fn_without_kwargs_and_local_inspection():
    run_ranks(_run_tools, 2, pg_timeout_s=20)


def _run_custom_auto(rank, world):
    return load_custom_model_example().run(split=None)


def test_custom_model_splits_without_an_fqn_list():
    """Embedding and output projection are found from the module tree, not assumed names."""
    results = run_ranks(_run_custom_auto, 2)
    assert all(r["max_grad_diff"] < 1e-5 for r in results)


def _run_empty_split(rank, world, data_dir, tokenizer_dir):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from nemo_pp.training.data import build_dataset_main_first

    node = OmegaConf.create({"validation_dataset": {
        "_target_": "nemo_pp.datasets.llm.squad.SQuAD", "path_or_dataset": data_dir, "split": "validation",
        "seq_length": 32,
    }}).validation_dataset
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        build_dataset_main_first(node, "validation_dataset", tok, is_main=rank == 0)
    except ValueError as exc:
        return str(exc)
    return None


def test_empty_split_fails_with_the_same_error_on_every_rank(real_assets, tmp_path):
    data = tmp_path / "squad"
    data.mkdir()
    (data / "train.jsonl").write_text((real_assets[1] / "validation.jsonl").read_text().splitlines()[0] + "\n")
    (data / "validation.jsonl").write_text("")
    errors = run_ranks(_run_empty_split, 2, str(data), str(real_assets[0]), pg_timeout_s=30)
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert errors[0].startswith("validation_dataset"), errors[0]


def _run_checkpointed(rank, world):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ref = tiny_model("llama", True, 4)
    batch = make_batch(4, 16, ref.config.vocab_size, seed=5)
    ref_loss, ref_grads, tokens = reference(copy.deepcopy(ref), [batch])
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=4, device=torch.device("cpu")).build(
        ref, loss_fn=sum_ce, parallelize_fn=parallelize_chain(mesh, activation_checkpointing=True))
    calls = [0]
    for part in ap.parts:
        for layer in part.model.layers.values():
            layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ap.update_seq_len(16)
    losses = step_once(ap.info, *batch)
    assert calls[0] == 2 * 2 * 4  # 2 local layers x 4 microbatches, each run again in backward
    _assert_matches_reference(ap, losses, tokens, ref_grads, ref_loss)
    return True


def test_activation_checkpointing_recomputes_and_changes_nothing():
    run_ranks(_run_checkpointed, 2)


HEAD_ALONE = [["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
               "model.norm", "model.rotary_emb"], ["lm_head"]]


@pytest.mark.parametrize("world,schedule", [(2, "1f1b"), (1, "interleaved_1f1b")])
def test_a_stage_of_lm_head_alone_applies_it(world, schedule):
    """The costly head (vocabulary x hidden plus the loss) may be a stage of its own."""
    run_ranks(run_parity, world, ParityCase(arch="llama", tied=True, schedule=schedule, layers=4, batch=4, seq_lens=(16,)),
              world, {"module_fqns_per_model_part": HEAD_ALONE})


def _run_fsdp_mixed_precision(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=2))
    ref = tiny_model("llama", True, 4)
    batch = make_batch(4, 16, ref.config.vocab_size, seed=7)
    ref_loss, ref_grads, tokens = reference(copy.deepcopy(ref), [batch])
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=4, pp_seq_len=16, activation_dtype=mp.param_dtype,
                      device=torch.device("cpu")).build(ref, loss_fn=sum_ce, parallelize_fn=parallelize_chain(mesh, mp_policy=mp))
    sent = []
    if ap.info.has_first_stage:
        ap.parts[0].register_forward_hook(lambda m, a, out: sent.append(out.dtype))
    losses = step_once(ap.info, *batch)
    assert all(p.to_local().dtype == torch.float32 for part in ap.parts for p in part.parameters())  # fp32 masters
    assert set(sent) == ({torch.bfloat16} if ap.info.has_first_stage else set())  # the P2P activations are bf16
    ap.scale_grads_by_divisor(tokens * mesh.sizes.dp)  # both dp ranks ran the same batch; FSDP summed them
    ap.sync_tied_grads()
    for part in ap.parts:
        for name, p in part.named_parameters():
            g, r = p.grad.full_tensor().float().flatten(), ref_grads[name].flatten()
            cos = float(torch.nn.functional.cosine_similarity(g, r, dim=0))
            assert cos > 0.99, (name, cos)  # bf16 compute, fp32 reduce: close, not equal
    if losses:
        loss = float(sum(l.detach().float() for l in losses)) / tokens
        assert abs(loss - ref_loss) < 2e-2 * abs(ref_loss), (loss, ref_loss)
    return True


def test_fsdp2_mixed_precision_bf16_compute_on_fp32_masters():
    run_ranks(_run_fsdp_mixed_precision, 4, timeout=240)


def _run_balanced(rank, world):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ref = tiny_model("llama", True, 6, vocab=4096)  # a head worth several layers
    batch = make_batch(4, 16, 4096, seed=11)
    ref_loss, ref_grads, tokens = reference(copy.deepcopy(ref), [batch])
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=4, pp_seq_len=16,
                      device=torch.device("cpu")).build(ref, loss_fn=sum_ce)
    counts = [sum(".layers." in n for n in names) for names in ap.plan.module_fqns]
    losses = step_once(ap.info, *batch)
    _assert_matches_reference(ap, losses, tokens, ref_grads, ref_loss)
    return counts


def test_balanced_split_changes_the_boundaries_not_the_numbers():
    counts = run_ranks(_run_balanced, 2)[0]
    assert counts != [3, 3] and sum(counts) == 6, counts  # not the uniform split
