"""Every common decoder family through the pipeline: at 2 and 4 stages the loss and every
gradient equal Hugging Face's own forward of the unsplit model (tiny random configs).

Family-specific steps the patched stage forwards must keep (read from config fields):
Granite's embedding multiplier and logits scaling, Cohere's logit scale, Gemma 2 / 3's
final-logit soft-capping and sliding-window layers, Gemma's scaled embedding buffer.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.distributed.test_pipeline_parity import ATOL, make_batch, reference, step_once, sum_ce

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=8)

#: model_type -> extra config fields (small, and switching on what makes the family differ)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0,
               "query_pre_attn_scalar": 8},
    "gemma3_text": {"sliding_window": 8, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 8},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {"embedding_multiplier": 3.0, "logits_scaling": 4.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.2},
    "cohere": {"logit_scale": 0.5},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
}


def family_model(model_type: str, **overrides) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **{**FAMILIES[model_type], **overrides})
    config._attn_implementation = "eager"  # soft-capping and sliding windows in every family's own code path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _run(rank, world, model_type):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ref = family_model(model_type)
    model = copy.deepcopy(ref)
    batches = [make_batch(4, 16, ref.config.vocab_size, seed=i) for i in range(2)]
    ref_loss, ref_grads, tokens = reference(ref, batches)
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=4, split="uniform",
                      device=torch.device("cpu")).build(model, loss_fn=sum_ce)
    total = 0.0
    for ids, lb in batches:
        ap.update_seq_len(ids.shape[1])
        losses = step_once(ap.info, ids, lb)
        if losses is not None:
            total += float(sum(l.detach() for l in losses))
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()
    for part in ap.parts:
        for name, p in part.named_parameters():
            if name not in ref_grads or ref_grads[name] is None:
                continue
            torch.testing.assert_close(p.grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if ap.info.has_last_stage:
        assert abs(total / tokens - ref_loss) < ATOL * max(1.0, ref_loss), (total / tokens, ref_loss)
    return True


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_matches_hf_forward(model_type, pp):
    run_ranks(_run, pp, model_type, timeout=180)


def test_moe_router_loss_is_refused_not_dropped():
    from nemo_pp.models.stage_forward import validate_hf_model_for_pipeline_support

    model = family_model("mixtral")
    validate_hf_model_for_pipeline_support(model)
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="model type 'mixtral' has output_router_logits: true"):
        validate_hf_model_for_pipeline_support(model)


def test_readme_lists_every_family_of_the_matrix():
    """The README's family list is this matrix (run `python tests/distributed/test_family_matrix.py` to print it)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert families_line() in readme


def families_line() -> str:
    return "Proven families (model_type): " + ", ".join(f"`{t}`" for t in FAMILIES) + "."


if __name__ == "__main__":
    print(families_line())
