"""The fused linear cross-entropy on the last stage (the logits never formed) trains exactly
as the unsplit Hugging Face model with its own logits and a plain cross entropy: loss and
every gradient per step, weights after AdamW steps, at pp 1, pp 2 with a tied embedding,
pp 2 x tp 2 (the loss on vocabulary shards, with and without sequence parallelism), FSDP2,
for families that scale or soft-cap their logits, and with LoRA on the output projection."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import (
    LR,
    MAX_NORM,
    assert_weights_match,
    family_model,
    full_tensor,
    optimizer_step_keeps_tie,
    reference_training,
    training_batches,
)
from tests.tiny_models import tiny_model

#: small chunks: the test batches' label tokens span several of them
CHUNK = 7


def _model(arch: str, tied: bool):
    return tiny_model(arch, tied, layers=4) if arch == "llama" else family_model(arch, tie_word_embeddings=tied)


def _run(rank, world, pp, tp, arch, tied, sp=False, lora=False):
    from nemo_pp._peft.lora import PeftConfig, apply_lora
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import parallelize_chain
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.loss import FusedLinearCrossEntropy
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp, tp_size=tp))
    dp, dp_rank = mesh.sizes.dp, mesh.dp_rank
    ref = _model(arch, tied)
    peft = None
    if lora:  # every linear module, the output projection included; B random so the head's adapter matters
        peft = PeftConfig(match_all_linear=True, dim=4, alpha=8, dropout=0.0)
        torch.manual_seed(1)
        apply_lora(ref, peft)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model = copy.deepcopy(ref)
    steps = training_batches(2, 2, dp, 4, (16, 24), ref.config.vocab_size)
    expected = reference_training(ref, steps, LR)

    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b" if pp > 1 else "gpipe", pp_batch_size=4,
                      device=torch.device("cpu"), sequence_shards=tp if sp else 1).build(
        model, loss_fn=FusedLinearCrossEntropy(chunk_size=CHUNK),
        parallelize_fn=parallelize_chain(mesh, sequence_parallel=sp))
    assert ap.head_computes_loss
    if lora:
        assert any(n.startswith("lm_head.lora_A") for part in ap.parts for n, _ in part.named_parameters()) \
            or not ap.info.has_last_stage
    opts = [torch.optim.AdamW([p for p in part.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
            for part in ap.parts]
    engine = TrainEngine(ap, torch.device("cpu"), dp_group=mesh.dp.get_group() if dp > 1 else None,
                         max_grad_norm=MAX_NORM)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], [], [])
        loss = expected[step]["loss"]
        assert abs(out["loss"] - loss) <= 1e-6 * abs(loss), (step, out["loss"], loss)
        _assert_trainable_grads_match(ap, expected[step]["grads"])
        optimizer_step_keeps_tie(ap, opts)
    assert_weights_match(ap, ref)
    val = engine.validation_loss(steps[0][dp_rank])  # the token mean over every dp rank's batches
    assert val == pytest.approx(_reference_val(ref, [b for group in steps[0] for b in group]), rel=1e-6)
    return True


def _assert_trainable_grads_match(ap, grads: dict) -> None:
    """Every trainable parameter's gradient (LoRA: the adapters') equals the reference's."""
    for part in ap.parts:
        for name, p in part.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(full_tensor(p.grad), grads[name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name}: {m}")


def _reference_val(model, batches) -> float:
    from tests.helpers import sum_ce

    with torch.no_grad():
        total = sum(float(sum_ce(model(input_ids=b["input_ids"]).logits, b["labels"])) for b in batches)
    return total / sum(int((b["labels"] != -100).sum()) for b in batches)


CASES = {
    "pp1-tied": (1, 1, 1, "llama", True),
    "pp2-tied": (2, 2, 1, "llama", True),
    "pp2-dp2-fsdp": (4, 2, 1, "llama", False),
    "pp2-tp2-tied": (4, 2, 2, "llama", True),
    # logits soft-capped (Gemma 2), divided (Granite), multiplied (Cohere, tied)
    "pp2-gemma2": (2, 2, 1, "gemma2", False),
    "pp2-granite": (2, 2, 1, "granite", False),
    "pp2-cohere-tied": (2, 2, 1, "cohere", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_matches_the_unsplit_model(case):
    world, pp, tp, arch, tied = CASES[case]
    run_ranks(_run, world, pp, tp, arch, tied, timeout=300)


def test_fused_loss_on_vocabulary_shards_with_sequence_parallelism():
    run_ranks(_run, 4, 2, 2, "llama", True, True, timeout=300)


def test_fused_loss_with_lora_on_the_output_projection():
    run_ranks(_run, 2, 2, 1, "llama", False, False, True, timeout=300)


def _custom_model_with_fused_loss(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from nemo_pp.distributed.pipelining.functional import pipeline_model
    from nemo_pp.loss import FusedLinearCrossEntropy
    from tests.helpers import load_custom_model_example

    example = load_custom_model_example()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    with pytest.raises(ValueError, match=r"loss_fn \(FusedLinearCrossEntropy\) needs the last stage to hold the "
                                         r"output projection \(lm_head\); CustomModel has none"):
        pipeline_model(example.CustomModel(), world_mesh=mesh, moe_mesh=None, pp_axis_name="pp", dp_axis_names=("dp",),
                       pipeline_parallel_schedule="1f1b", microbatch_size=1, local_batch_size=4,
                       device=torch.device("cpu"), loss_fn=FusedLinearCrossEntropy(),
                       module_fqns_per_model_part=example.SPLIT, patch_inner_model=False, patch_causal_lm_model=False)
    return True


def test_fused_loss_refused_for_a_custom_model_without_output_projection():
    run_ranks(_custom_model_with_fused_loss, 2)
