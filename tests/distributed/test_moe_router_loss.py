"""The router's load-balancing loss inside each pipeline stage (nemo_pp.models.moe): through
the recipe's TrainEngine the LM loss, the auxiliary loss, the tokens each expert received,
the grad norm and the weights after AdamW steps equal the unsplit Hugging Face model trained
on the same global batches, whose loss is formed from its own ``router_logits`` by the
family's own ``load_balancing_loss_func`` (per layer, per sequence; see the module's doc).

The coefficient is 1.0 so the auxiliary gradient stands far above the tolerance: leaving the
loss out of any stage's backward (a middle stage at pp 4, a virtual stage under interleaving,
the weight pass of a zero-bubble schedule) fails these tests.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import (
    FAMILIES,
    MAX_NORM,
    MOE_FAMILIES,
    assert_weights_match,
    family_model,
    moe_family_model,
    reference_moe_training,
    sum_ce,
    training_batches,
)


def _run(rank, world, model_type, pp, schedule, microbatch=2, fsdp=False, activation_checkpointing=False, drop_stage=None,
         ep=1, tp=1, starve=False, experts_implementation="grouped_mm", rep=1, fused_loss=False):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.planning.schedules import SPLIT_BACKWARD_SCHEDULES, canonical_schedule_name
    from nemo_pp.training.engine import TrainEngine
    from tests.helpers import LR

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp, ep_size=ep, tp_size=tp,
                                                           dp_replicate_size=rep))
    dp, dp_rank = mesh.sizes.dp, mesh.dp_rank
    ref = moe_family_model(model_type)
    # transformers' default, which the ep forward follows with grouped GEMMs; "eager": a loop
    ref.config._experts_implementation = experts_implementation
    if starve:  # equal logits: every token picks experts 0 and 1, so the other ep rank's experts get no row
        from nemo_pp.models.moe import router_spec

        for m in ref.modules():
            if isinstance(m, router_spec(ref).router_class):
                torch.nn.init.zeros_(m.weight)
    model = copy.deepcopy(ref)
    steps = training_batches(2, 2, dp, 4, (16, 8), ref.config.vocab_size)
    # expert parallelism sums each token's expert outputs in another order: Adam would turn those
    # 1e-8 gradient differences into ~lr updates of near-zero-gradient weights (tests/helpers.py, LR)
    lr = LR / 10 if ep > 1 else LR
    expected = reference_moe_training(ref, steps, microbatch, lr=lr)

    if fused_loss:  # the last stage's loss from hidden states, beside the routers' loss
        from nemo_pp.loss import FusedLinearCrossEntropy

        loss_fn = FusedLinearCrossEntropy(chunk_size=5)
    else:
        loss_fn = sum_ce
    split = canonical_schedule_name(schedule) in SPLIT_BACKWARD_SCHEDULES
    chain = parallelize_chain(mesh, activation_checkpointing=activation_checkpointing, reshard_after_forward=not split) \
        if fsdp or activation_checkpointing or ep > 1 or tp > 1 else None
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_batch_size=4, pp_microbatch_size=microbatch,
                      split="uniform", device=torch.device("cpu")).build(model, loss_fn=loss_fn, parallelize_fn=chain)
    assert ap.router_loss is not None and ap.router_loss.aux_loss
    if ep > 1:  # each rank holds its E / ep experts of every layer, as DTensor shards of the whole
        import torch.distributed as dist

        from nemo_pp.models.moe import expert_modules

        # the reference's moe_mesh (pp, ep_shard, ep): ep and ep_shard split this stage's dp group
        names = ("pp",) + (("dp_replicate",) if rep > 1 else ()) + ("ep_shard", "ep") + (("tp",) if tp > 1 else ())
        assert mesh.moe.mesh_dim_names == names and mesh.ep.size() == ep
        ep_ranks = dist.get_process_group_ranks(mesh.ep.get_group())
        same = mesh.moe[mesh.ep_shard_axis_names] if rep > 1 else mesh.moe["ep_shard"]  # ranks holding the same experts
        shard_ranks = sorted({r for g in ([same.get_group(i) for i in range(same.ndim)]) for r in
                              dist.get_process_group_ranks(g)}) if rep > 1 else dist.get_process_group_ranks(same.get_group())
        dp_ranks = dist.get_process_group_ranks(mesh.dp.get_group())
        assert set(ep_ranks) <= set(dp_ranks) and set(shard_ranks) <= set(dp_ranks)
        assert len(ep_ranks) * len(shard_ranks) == dp and set(ep_ranks) & set(shard_ranks) == {rank}
        if tp > 1:  # the ep group holds ranks of one tp index: the tp ranks see the same tokens
            tp_index = mesh.world.get_local_rank("tp")
            assert all(r % tp == tp_index for r in ep_ranks)
            attention = next(m for part in ap.parts for n, m in part.named_modules() if n.endswith("self_attn.o_proj"))
            assert attention.weight.to_local().shape[1] * tp == attention.weight.shape[1]

        ep_shard = dp // rep // ep
        for module in (m for part in ap.parts for m in expert_modules(part)):
            # E / ep experts per ep rank, FSDP2 splits those again over ep_shard
            assert module.gate_up_proj.to_local().shape[0] == module.num_experts // ep // ep_shard
            assert module.gate_up_proj.shape[0] == module.num_experts
    if drop_stage is not None:  # break it on purpose: the test must see the missing term
        for stage, part in zip(ap.info.stages, ap.parts):
            if stage.stage_index == drop_stage:
                for layer in part.model.layers.values():
                    layer._forward_hooks.clear()
    opts = [torch.optim.AdamW(p.parameters(), lr=lr, weight_decay=0.1) for p in ap.parts]
    engine = TrainEngine(ap, torch.device("cpu"), dp_group=mesh.dp.get_group() if dp > 1 else None, max_grad_norm=MAX_NORM)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], opts, [])
        want = expected[step]
        assert abs(out["loss"] - want["loss"]) < 1e-5 * max(1.0, want["loss"]), (step, out["loss"], want["loss"])
        assert abs(out["aux_loss"] - want["aux"]) < 1e-5, (step, out["aux_loss"], want["aux"])
        torch.testing.assert_close(out["expert_tokens"], want["tokens"], atol=0, rtol=0)  # routing identical
        assert abs(out["grad_norm"] - want["norm"]) < 1e-5 * max(1.0, want["norm"]), (step, out["grad_norm"], want["norm"])
    assert_weights_match(ap, ref)
    return True


def test_moe_families_are_the_matrix_families_with_a_router_loss():
    from nemo_pp.models.moe import router_spec

    found = [t for t in FAMILIES if (spec := router_spec(family_model(t))) is not None and spec.load_balancing_loss]
    assert tuple(found) == MOE_FAMILIES


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_pp2_router_loss_matches_reference(model_type):
    """Every MoE family of the matrix with ``output_router_logits: true`` (Qwen2-MoE: dense and
    sparse layers alternate, so stages hold different numbers of MoE layers)."""
    run_ranks(_run, 2, model_type, 2, "1f1b", timeout=180)


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "zbv"])
def test_virtual_and_split_backward_stages_carry_the_router_loss(schedule):
    """Two stages per rank; zbv also splits backward into input and weight passes."""
    run_ranks(_run, 2, "mixtral", 2, schedule, timeout=180)


def test_pp4_middle_stages_carry_the_router_loss():
    run_ranks(_run, 4, "qwen3_moe", 4, "1f1b", 1, timeout=180)


def test_pp2_x_fsdp2_with_activation_checkpointing_matches_reference():
    """FSDP2 over 2 data-parallel ranks (the loss averages over their microbatches too) with
    the layers recomputed in backward: the capture hooks run once per real forward."""
    run_ranks(_run, 4, "mixtral", 2, "1f1b", 2, True, True, timeout=240)


def test_a_stage_without_its_router_loss_fails_the_comparison():
    """The check above can fail: the middle stage 1 of 4 dropping its layers' loss is caught."""
    with pytest.raises(Exception, match="aux|Tensor-likes are not close|grad_norm|router"):
        run_ranks(_run, 4, "qwen3_moe", 4, "1f1b", 1, False, False, 1, timeout=180)


EP_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")  # fused experts (granitemoe's have another layout)


def test_the_ep_proven_list_is_the_families_tested_here():
    from nemo_pp.models.moe import EP_PROVEN_MODEL_TYPES

    # DeepSeek-V3's parity under ep (no load-balancing loss, a routing bias): test_moe_gate_bias.py
    assert EP_PROVEN_MODEL_TYPES == set(EP_FAMILIES) | {"deepseek_v3"}


@pytest.mark.parametrize("model_type", EP_FAMILIES)
def test_expert_parallel_ep2_matches_reference(model_type):
    """ep 2 on 2 data-parallel ranks (pp 1): each rank holds half the experts, tokens go to
    them by all-to-all and back; the router's loss, the routing, the grad norm and the weights
    after AdamW steps equal the unsplit model's. Non-expert parameters are FSDP2-sharded."""
    run_ranks(_run, 2, model_type, 1, "gpipe", 2, False, False, None, 2, timeout=180)


def test_pp2_x_ep2_with_activation_checkpointing_matches_reference():
    """pp 2 x ep 2 on 4 ranks, 1F1B, the layers recomputed in backward (the all-to-alls run again)."""
    run_ranks(_run, 4, "mixtral", 2, "1f1b", 2, False, True, None, 2, timeout=240)


def test_pp2_x_ep2_with_the_fused_loss_matches_reference():
    """The fused loss on the last stage of an MoE model under expert parallelism: LM loss,
    router loss, routing and weights as the unsplit model's."""
    run_ranks(_run, 4, "qwen3_moe", 2, "1f1b", 2, False, False, None, 2, 1, False, "grouped_mm", 1, True, timeout=240)


def test_ep2_x_ep_shard2_fsdp2_over_the_shared_experts_matches_reference():
    """ep 2 on 4 data-parallel ranks: each pair of ranks holding the same experts (ep_shard 2)
    FSDP2-shards them and reduce-scatters their gradients; everything else FSDP2 over all 4."""
    run_ranks(_run, 4, "qwen3_moe", 1, "gpipe", 2, False, False, None, 2, timeout=240)


def test_pp2_x_ep2_x_ep_shard2_matches_reference():
    """The issue's layout on 8 ranks: pp 2 x (ep_shard 2 x ep 2), 1F1B, layers recomputed."""
    run_ranks(_run, 8, "mixtral", 2, "1f1b", 2, False, True, None, 2, timeout=400)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "olmoe"])  # Mixtral: pp 2 x tp 2 x ep 2 below
def test_tp2_on_the_attention_x_ep2_matches_reference(model_type):
    """tp 2 x ep 2 on 4 ranks (pp 1): tp shards the attention (Qwen3-MoE: with its per-head q/k
    norms; Qwen2-MoE: and its dense MLP layers), ep the experts; each tp rank routes the same
    tokens within its own ep group."""
    run_ranks(_run, 4, model_type, 1, "gpipe", 2, False, False, None, 2, 2, timeout=240)


def test_pp2_x_tp2_x_ep2_matches_reference():
    run_ranks(_run, 8, "mixtral", 2, "1f1b", 2, False, True, None, 2, 2, timeout=400)


def test_an_ep_rank_whose_experts_receive_no_token_still_joins_the_backward():
    """Routers at zero send every token of the first step to experts 0 and 1 (ep rank 0): rank
    1's experts compute nothing, yet its backward must run the reverse all-to-alls and give its
    experts a (zero) gradient, or both ranks hang (found on DeepSeek-V3's routing)."""
    run_ranks(_run, 2, "mixtral", 1, "gpipe", 2, False, False, None, 2, 1, True, timeout=180)


def test_expert_parallel_with_eager_experts_loops_over_the_local_experts():
    """``eager`` experts (one matmul pair per expert) under ep 2, against HF's eager experts."""
    run_ranks(_run, 2, "qwen3_moe", 1, "gpipe", 2, False, False, None, 2, 1, False, "eager", timeout=180)


def test_hsdp_x_ep2_replicates_the_experts_over_the_replicas():
    """HSDP (dp_replicate 2 x dp_shard 2) with ep 2 inside each replica: the experts are an
    FSDP2 unit over (dp_replicate, ep_shard), so the replicas all-reduce their gradients."""
    run_ranks(_run, 4, "mixtral", 1, "gpipe", 2, False, False, None, 2, 1, False, "grouped_mm", 2, timeout=240)
