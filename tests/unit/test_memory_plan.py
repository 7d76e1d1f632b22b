"""The memory plan: exact byte counts for parameters and state, activations measured on
the meta device equal to the same forward on real CPU tensors, and the schedule's
microbatches in flight."""

from __future__ import annotations

import pytest
import torch

from nemo_pp.models.loading import empty_model
from nemo_pp.models.module_tree import copy_pruned
from nemo_pp.models.stage_forward import make_stage_emit_tensor, patch_hf_model_for_pp
from nemo_pp.planning.memory import memory_plan, saved_activation_bytes
from nemo_pp.planning.pipeline import make_pipeline_plan
from tests.tiny_models import tiny_config, tiny_model


def _stage(model, names):
    part = copy_pruned(model, names)
    patch_hf_model_for_pp(part)
    make_stage_emit_tensor(part)
    return part


def _cpu_saved_bytes(part, hidden: torch.Tensor) -> int:
    """What autograd keeps in a real CPU forward of ``part`` with torch's own kernels, by the
    tensor owning the memory, parameters excluded (each kept alive, so no id is reused)."""
    params = {id(p) for p in part.parameters()}
    kept: dict[int, tuple] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            kept[id(base)] = (base, base.numel() * base.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        part(hidden, causal_mask_mapping={"full_attention": None})
    return sum(n for _, n in kept.values())


def test_activations_measured_on_meta_match_a_real_cpu_forward():
    """The meta count against what autograd really keeps on CPU with torch's own SDPA kernel
    (the meta count models attention as a fused kernel keeps it: q, k, v, output, lse)."""
    real = tiny_model("llama", layers=2)
    names = ["model.layers.0", "model.layers.1", "model.norm", "lm_head", "model.rotary_emb"]
    cpu = _cpu_saved_bytes(_stage(real, names), torch.randn(2, 16, 32, requires_grad=True))
    meta = saved_activation_bytes(_stage(real, names).to("meta"), torch.empty(2, 16, 32, device="meta",
                                                                               requires_grad=True))
    assert cpu > 0 and abs(meta - cpu) <= 0.1 * cpu, (meta, cpu)


def test_plan_counts_state_and_microbatches_in_flight():
    model = empty_model(tiny_config("llama", tied=False, layers=4))
    plan = make_pipeline_plan(model, 2, "1f1b", pp_batch_size=4)
    ranks = memory_plan(model, plan, seq_len=16)
    stage_params = [sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
                    for names in plan.module_fqns]
    for r in ranks:
        assert r.param_bytes == r.grad_bytes == 4 * stage_params[r.pp_rank]
        assert r.optimizer_bytes == 2 * r.param_bytes  # AdamW: two fp32 states
    assert [r.in_flight for r in ranks] == [{0: 2}, {1: 1}]  # 1F1B: pp - rank warm-up microbatches
    gpipe = memory_plan(model, make_pipeline_plan(model, 2, "gpipe", pp_batch_size=4), seq_len=16)
    assert [r.in_flight for r in gpipe] == [{0: 4}, {1: 4}]  # GPipe: every forward before any backward
    assert gpipe[0].activation_bytes == 2 * ranks[0].activation_bytes
    sharded = memory_plan(model, plan, seq_len=16, fsdp_shards=2)
    assert sharded[0].param_bytes == ranks[0].param_bytes // 2


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_activation_checkpointing_keeps_less(schedule):
    model = empty_model(tiny_config("llama", layers=8))
    plan = make_pipeline_plan(model, 2, schedule, pp_batch_size=4)
    plain = memory_plan(model, plan, seq_len=64)
    ckpt = memory_plan(model, plan, seq_len=64, activation_checkpointing=True)
    for p, c in zip(plain, ckpt):
        assert 0 < c.activation_bytes < p.activation_bytes
        assert c.param_bytes == p.param_bytes


def test_a_stage_without_layers_is_planned_and_checkpointed():
    from nemo_pp.distributed.parallelize import checkpoint_decoder_layers

    model = empty_model(tiny_config("llama", layers=2))
    split = [["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb"], ["lm_head"]]
    plan = make_pipeline_plan(model, 2, "1f1b", pp_batch_size=2, module_fqns_per_model_part=split)
    assert all(r.activation_bytes > 0 for r in memory_plan(model, plan, seq_len=8, activation_checkpointing=True))
    assert checkpoint_decoder_layers(copy_pruned(model, ["lm_head"]), required=False) == 0


def test_mixture_of_experts_activations_and_expert_gradients_per_ep_rank():
    """A mixture of experts: the meta count (balanced routing) against a real CPU forward of
    the eager experts, whose routing is not balanced but dropless (every expert keeps its
    rows, ``N * top_k`` in all); under ep each rank's expert gradients are ``1 / ep``."""
    from nemo_pp.models.moe import expert_modules

    real = tiny_model("mixtral", layers=2)
    names = ["model.layers.0", "model.layers.1", "model.norm", "lm_head", "model.rotary_emb"]
    hidden = real.config.hidden_size
    cpu = _cpu_saved_bytes(_stage(real, names), torch.randn(2, 32, hidden, requires_grad=True))
    meta = saved_activation_bytes(_stage(real, names).to("meta"),
                                  torch.empty(2, 32, hidden, device="meta", requires_grad=True))
    assert cpu > 0 and abs(meta - cpu) <= 0.1 * cpu, (meta, cpu)

    model = empty_model(real.config)
    plan = make_pipeline_plan(model, 2, "1f1b", pp_batch_size=4)
    whole, ep2 = memory_plan(model, plan, seq_len=16, fsdp_shards=2), memory_plan(model, plan, 16, fsdp_shards=2, ep=2)
    for stage, (a, b) in enumerate(zip(whole, ep2)):
        part = copy_pruned(model, plan.module_fqns[stage])
        experts = sum(p.numel() * p.element_size() for m in expert_modules(part) for p in m.parameters())
        assert experts > 0 and a.grad_bytes - b.grad_bytes == experts // 2
        assert (a.param_bytes, a.optimizer_bytes, a.activation_bytes) == (b.param_bytes, b.optimizer_bytes,
                                                                           b.activation_bytes)


def test_a_dense_then_sparse_stack_is_counted_layer_by_layer():
    """DeepSeek-V3's dense first layer keeps far less than its MoE layers (which keep ``top_k``
    copies of every token): each layer's meta count is within 10% of a real CPU forward, and
    activation checkpointing keeps each layer's input and recomputes the largest layer."""
    from nemo_pp.planning.memory import layer_activation_bytes
    from tests.helpers import family_model

    real = family_model("deepseek_v3")
    names = ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "model.norm", "lm_head",
             "model.rotary_emb"]
    hidden = real.config.hidden_size
    cpu = layer_activation_bytes(_stage(real, names), torch.randn(2, 32, hidden, requires_grad=True))
    meta = layer_activation_bytes(_stage(real, names).to("meta"),
                                  torch.empty(2, 32, hidden, device="meta", requires_grad=True))
    assert cpu[1] > 1.25 * cpu[0], cpu  # the MoE layer against the dense one
    for m, c in zip(meta, cpu):
        assert abs(m - c) <= 0.1 * c, (meta, cpu)

    model = empty_model(real.config)
    plan = make_pipeline_plan(model, 1, "gpipe", pp_batch_size=2, pp_microbatch_size=2)
    plain, ckpt = (memory_plan(model, plan, seq_len=32, activation_checkpointing=ac)[0] for ac in (False, True))
    each = layer_activation_bytes(_stage(model, plan.module_fqns[0]).to("meta"),
                                  torch.empty(2, 32, hidden, device="meta", requires_grad=True))
    kept_inputs = len(each) * 2 * 32 * hidden * 4
    assert plain.activation_bytes - ckpt.activation_bytes == sum(each) - kept_inputs - max(each)


def test_fused_loss_keeps_no_logits_on_the_last_stage():
    from nemo_pp.loss import FusedLinearCrossEntropy

    model = empty_model(tiny_config("llama", tied=False, layers=4))
    plan = make_pipeline_plan(model, 2, "1f1b", pp_batch_size=4)
    plain = memory_plan(model, plan, seq_len=16)[1].activation_bytes
    fused = memory_plan(model, plan, seq_len=16, loss_fn=FusedLinearCrossEntropy())[1].activation_bytes
    vocab = model.config.vocab_size
    # the head's [mb, S, V] fp32 log-softmax is gone; an [mb * S] fp32 log-sum-exp stays in its place
    # (nll_loss also keeps its 4-byte total weight)
    assert plain - fused - (16 * vocab * 4 - 16 * 4) in (0, 4), (plain, fused)


@pytest.mark.parametrize("schedule,pool,buffers", [
    ("1f1b", False, [4, 4]),  # torch's own: one per microbatch (4) and direction
    ("1f1b", True, [2, 2]),  # pooled: rank 0 two gradient slots; rank 1 holds 1 microbatch, so 2 activation slots
    ("interleaved_1f1b", True, [12, 12]),  # not pooled under a multi-stage schedule: 3 directions x 4
])
def test_receive_buffers_per_microbatch_or_pooled(schedule, pool, buffers):
    import dataclasses

    model = empty_model(tiny_config("llama", tied=False, layers=4))
    plan = dataclasses.replace(make_pipeline_plan(model, 2, schedule, pp_batch_size=4), pool_recv_buffers=pool)
    per_buffer = 1 * 16 * model.config.hidden_size * 4  # [mb, S, H] fp32
    ranks = memory_plan(model, plan, seq_len=16)
    assert [r.recv_buffer_bytes for r in ranks] == [b * per_buffer for b in buffers]
    # a received activation is the held microbatch's input, already in activation_bytes: counted once
    assert [r.recv_in_activation_bytes for r in ranks] == [
        per_buffer * sum(n for stage, n in r.in_flight.items() if stage != 0) for r in ranks]
    if schedule == "1f1b":
        assert [r.recv_in_activation_bytes for r in ranks] == [0, per_buffer]  # rank 1 holds 1 microbatch
    assert all(r.total_bytes == r.param_bytes + r.grad_bytes + r.optimizer_bytes + r.activation_bytes
               + r.recv_buffer_bytes - r.recv_in_activation_bytes for r in ranks)
