"""Every common decoder family through the pipeline: at 2 and 4 stages the loss and every
gradient equal Hugging Face's own forward of the unsplit model (tiny random configs).

Family-specific steps the patched stage forwards must keep (read from config fields):
Granite's embedding multiplier and logits scaling, Cohere's logit scale, Gemma 2 / 3's
final-logit soft-capping and sliding-window layers, Gemma's scaled embedding buffer.

The matrix itself (``FAMILIES``, ``family_model``) is in tests/helpers.py: the context-parallel
tests run every family too.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import ATOL, FAMILIES, family_model, make_batch, reference, step_once, sum_ce


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


def test_router_loss_is_accepted_where_stages_can_form_it_and_refused_elsewhere():
    """``output_router_logits: true`` passes on an MoE family with a recorded router and a
    ``load_balancing_loss_func``; a dense family, or one that balances by a routing bias
    (GLM-4-MoE, DeepSeek-V3: no such function), is refused naming the key."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_pp.models.stage_forward import validate_hf_model_for_pipeline_support

    model = family_model("mixtral", output_router_logits=True)
    validate_hf_model_for_pipeline_support(model)
    dense = family_model("llama")
    dense.config.output_router_logits = True
    with pytest.raises(ValueError, match="model.output_router_logits: true, but model type 'llama' records no router"):
        validate_hf_model_for_pipeline_support(dense)
    config = AutoConfig.for_model("glm4_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                  n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, head_dim=8)
    config.output_router_logits = True
    with pytest.raises(ValueError, match="model type 'glm4_moe' ships no load_balancing_loss_func"):
        validate_hf_model_for_pipeline_support(AutoModelForCausalLM.from_config(config))


def test_readme_lists_every_family_of_the_matrix():
    """The README's family list is this matrix (run `python tests/distributed/test_family_matrix.py` to print it)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert families_line() in readme


def families_line() -> str:
    return "Proven families (model_type): " + ", ".join(f"`{t}`" for t in FAMILIES) + "."


if __name__ == "__main__":
    print(families_line())
