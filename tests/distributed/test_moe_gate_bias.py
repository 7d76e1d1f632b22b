"""DeepSeek-V3 under the pipeline and expert parallelism, with its auxiliary-loss-free balancing
(``model.gate_bias_update_factor``; Wang et al., 2024): the LM loss, the grad norm, the
tokens each expert received (the router's own group-limited, bias-shifted top-k), the weights
and the routing biases after AdamW steps equal the unsplit Hugging Face model trained on the
same global batches, whose biases move by ``u * sign(mean load - load)`` from the choices its
own routers returned.

The factor is large (0.05 against sigmoid scores near 0.5) so the bias moves the routing from
step to step: a bias left alone fails them (the last test).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import MAX_NORM, assert_weights_match, family_model, sum_ce, training_batches

FACTOR = 0.05
LR = 1e-3


def _model():
    model = family_model("deepseek_v3")
    model.config.gate_bias_update_factor = FACTOR
    return model


def _routers(model):
    from nemo_pp.models.moe import router_spec

    spec = router_spec(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, spec.router_class)]


def reference_gate_bias_training(model, steps) -> list[dict]:
    """The unsplit model trained with AdamW on each step's global batch, its routers' biases
    updated after each step from the experts its routers chose in that step."""
    routers = _routers(model)
    num_e = model.config.n_routed_experts
    counts = torch.zeros(len(routers), num_e, dtype=torch.float64)

    def counter(slot):
        def hook(module, args, output):
            counts[slot] += torch.bincount(output[2].flatten(), minlength=num_e).double()
        return hook

    for slot, (_, router) in enumerate(routers):
        router.register_forward_hook(counter(slot))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    out = []
    for per_dp in steps:
        flat = [b for group in per_dp for b in group]
        tokens = sum(int((b["labels"] != -100).sum()) for b in flat)
        counts.zero_()
        loss = 0.0
        for b in flat:
            ce = sum_ce(model(input_ids=b["input_ids"]).logits, b["labels"])
            (ce / tokens).backward()
            loss += float(ce.detach())
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        out.append({"loss": loss / tokens, "norm": norm, "tokens": counts.clone()})
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for slot, (_, router) in enumerate(routers):
                router.e_score_correction_bias += FACTOR * torch.sign(counts[slot].mean() - counts[slot]).float()
    return out


def _run(rank, world, pp, schedule, ep=1, factor=FACTOR, tp=1):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp, ep_size=ep, tp_size=tp))
    dp, dp_rank = mesh.sizes.dp, mesh.dp_rank
    ref = _model()
    model = copy.deepcopy(ref)
    model.config.gate_bias_update_factor = factor  # factor 0: the check below must fail
    steps = training_batches(3, 2, dp, 4, (16, 8), ref.config.vocab_size)
    expected = reference_gate_bias_training(ref, steps)
    chain = parallelize_chain(mesh) if ep > 1 else None
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=schedule, pp_batch_size=4, pp_microbatch_size=2,
                      split="uniform", device=torch.device("cpu")).build(model, loss_fn=sum_ce, parallelize_fn=chain)
    assert ap.router_loss is not None and not ap.router_loss.aux_loss  # DeepSeek-V3 ships no load-balancing loss
    opts = [torch.optim.AdamW(p.parameters(), lr=LR, weight_decay=0.1) for p in ap.parts]
    engine = TrainEngine(ap, torch.device("cpu"), dp_group=mesh.dp.get_group() if dp > 1 else None, max_grad_norm=MAX_NORM)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], opts, [])
        want = expected[step]
        assert out["aux_loss"] is None
        assert abs(out["loss"] - want["loss"]) < 1e-5 * max(1.0, want["loss"]), (step, out["loss"], want["loss"])
        torch.testing.assert_close(out["expert_tokens"], want["tokens"], atol=0, rtol=0)  # routing identical
        assert abs(out["grad_norm"] - want["norm"]) < 1e-5 * max(1.0, want["norm"]), (step, out["grad_norm"], want["norm"])
    assert_weights_match(ap, ref)
    ref_bias = {n: m.e_score_correction_bias for n, m in _routers(ref)}
    held = 0
    for part in ap.parts:
        for name, router in _routers(part):
            torch.testing.assert_close(router.e_score_correction_bias, ref_bias[name], atol=0, rtol=0)
            held += 1
    assert held and any(b.abs().sum() > 0 for b in ref_bias.values())
    return True


def test_pp2_gate_bias_balancing_matches_reference():
    run_ranks(_run, 2, 2, "1f1b", timeout=180)


def test_ep2_gate_bias_balancing_matches_reference():
    """ep 2 on 2 data-parallel ranks: the bias moves by the counts of both ranks' tokens."""
    run_ranks(_run, 2, 1, "gpipe", 2, timeout=180)


def test_pp2_x_ep2_matches_reference():
    run_ranks(_run, 4, 2, "1f1b", 2, timeout=240)


def test_ep2_x_ep_shard2_matches_reference():
    """4 data-parallel ranks, the experts FSDP2-sharded again over the ep_shard pairs."""
    run_ranks(_run, 4, 1, "gpipe", 2, timeout=240)


def test_tp2_x_ep2_matches_reference():
    """tp 2 shards what DeepSeek-V3's plan names (its dense layer's MLP), ep 2 the experts."""
    run_ranks(_run, 4, 1, "gpipe", 2, FACTOR, 2, timeout=240)


def test_a_bias_left_alone_fails_the_comparison():
    with pytest.raises(Exception, match="Tensor-likes are not|not equal|mismatch|assert"):
        run_ranks(_run, 2, 2, "1f1b", 1, 0.0, timeout=180)
