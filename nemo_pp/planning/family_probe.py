"""Exact or refused: a model family outside the proven matrix must pass a parity probe.

The patched stage forwards (:mod:`nemo_pp.models.stage_forward`) re-implement the part of
a Hugging Face decoder's forward that sits around its layers (embedding scale, masks,
rotary, final norm, logit scaling) from config fields and module names. A family that does
something there they do not know (Phi's ``final_layernorm`` was one) would train on wrong
numbers without a word. So a family that the test matrix has not proven
(:data:`PROVEN_MODEL_TYPES`, the families of ``tests/distributed/test_family_matrix.py``)
is probed before any weight is read: a tiny random copy of the model's own class and
config (4 layers, small widths) is split as a pipeline would split it, the stages are run
one after another in this process, and their logits are compared with Hugging Face's
forward of the unsplit copy, at 2 and 4 stages. Seconds on a CPU, no process group.

For a mixture of experts the router logits the stages' hooks capture
(:class:`nemo_pp.models.moe.RouterLoss`) are compared too, with the ``router_logits`` Hugging
Face's forward records: the load-balancing loss is the family's own function of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from nemo_pp.models.module_tree import copy_pruned, text_config
from nemo_pp.models.moe import router_spec
from nemo_pp.models.stage_forward import make_stage_emit_tensor, patch_hf_model_for_pp
from nemo_pp.models.vlm import PROVEN_TEXT_MODEL_TYPES, vision_family
from nemo_pp.planning.pipeline import make_pipeline_plan

__all__ = ["PROVEN_MODEL_TYPES", "ProbeResult", "check_model_family", "probe_model_family", "tiny_config"]

#: model types proven against Hugging Face's forward at 2 and 4 stages, loss and every
#: gradient (tests/distributed/test_family_matrix.py keeps this list and that matrix equal)
PROVEN_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere",
    "mixtral", "qwen3_moe", "phi", "starcoder2", "stablelm", "smollm3", "glm", "cohere2", "olmo", "nemotron",
    "qwen2_moe", "olmoe", "granitemoe", "deepseek_v3",
})

#: relative tolerance of the probe: max |logits - HF logits| / max(1, max |HF logits|), fp32
TOLERANCE = 1e-4

# config fields a tiny copy sets, where the config has them (sizes only: nothing that
# changes what the family's forward does)
_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16, "vocab_size": 256,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "n_embd": 64, "n_head": 4, "n_layer": 4,
    # multi-head latent attention (DeepSeek-V2/V3): its low ranks and per-head widths, the rotary
    # part as wide as head_dim (which these configs derive from it)
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
    # group-limited routing: 2 groups of the 4 experts, the top-k drawn from 1 of them
    "n_group": 2, "topk_group": 1,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the model type, the stage count and the relative logits difference."""

    model_type: str
    num_stages: int
    max_relative_diff: float

    @property
    def exact(self) -> bool:
        """Within :data:`TOLERANCE`."""
        return self.max_relative_diff <= TOLERANCE


def tiny_config(config, layers: int = 4):
    """A copy of ``config`` (the text config of a multimodal one) with 4 layers and small
    widths: the same architecture and family-specific fields, a few hundred thousand parameters."""
    tiny = copy.deepcopy(text_config(config))
    for key, value in _TINY.items():
        if getattr(tiny, key, None) is not None:
            setattr(tiny, key, value)
    heads = tiny.num_attention_heads
    if hasattr(tiny, "num_key_value_heads"):  # keep grouped-query attention grouped; None: one per head
        kv = tiny.num_key_value_heads
        tiny.num_key_value_heads = 2 if kv is not None and kv < text_config(config).num_attention_heads else heads
    if getattr(tiny, "num_experts_per_tok", None) is not None:
        tiny.num_experts_per_tok = min(tiny.num_experts_per_tok, 2)
    if getattr(tiny, "first_k_dense_replace", None):  # dense-then-sparse: keep one dense layer, the rest MoE
        tiny.first_k_dense_replace = 1
    tiny.num_hidden_layers = layers
    if isinstance(getattr(tiny, "layer_types", None), list):
        tiny.layer_types = list(tiny.layer_types)[:layers]
    if getattr(tiny, "sliding_window", None):
        tiny.sliding_window = min(tiny.sliding_window, 8)
    for key in _TOKEN_IDS:  # ids inside the small vocabulary
        value = getattr(tiny, key, None)
        if isinstance(value, int) and value >= tiny.vocab_size:
            setattr(tiny, key, tiny.vocab_size - 1)
    tiny.use_cache = False
    return tiny


def _stage_logits(model: nn.Module, num_stages: int, ids: torch.Tensor) -> torch.Tensor:
    """The pipelined forward in one process: the stages of a uniform ``num_stages`` split,
    pruned and patched as the builder does, run one after another."""
    plan = make_pipeline_plan(model, pp_size=num_stages, pp_schedule="gpipe", pp_batch_size=ids.shape[0],
                              split="uniform")
    x = ids
    spec = router_spec(model)
    captured: list[torch.Tensor] = []
    for names in plan.module_fqns:
        part = copy_pruned(model, names)
        patch_hf_model_for_pp(part)
        make_stage_emit_tensor(part)
        if spec is not None:
            for module in part.modules():
                if isinstance(module, spec.router_class):
                    module.register_forward_hook(lambda m, a, out: captured.append(
                        out[spec.logits_index] if isinstance(out, (tuple, list)) else out))
        x = part(x)
    return x, captured


def _diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))


def probe_model_family(model_class: type, config, stages=(2, 4), seed: int = 0) -> list[ProbeResult]:
    """Run the probe: a tiny random ``model_class`` of ``config``'s architecture, pipelined
    at each of ``stages`` and unsplit, on one random batch ``[2, 16]`` int64 of token ids.

    Raises:
        ValueError: the tiny copy cannot be built or run (the reason given).
    """
    model_type = getattr(text_config(config), "model_type", model_class.__name__)
    torch.manual_seed(seed)
    try:
        tiny = tiny_config(config)
        model = model_class(tiny).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # no zero-initialised pieces hiding a missing step
            ids = torch.randint(0, tiny.vocab_size, (2, 16))
            moe = router_spec(model) is not None
            out = model(input_ids=ids, output_router_logits=True) if moe else model(input_ids=ids)
            expected = out.logits
            expected_routers = [l.reshape(-1, l.shape[-1]) for l in (out.router_logits or ())] if moe else []
            results = []
            for n in stages:
                got, routers = _stage_logits(model, n, ids)
                diff = _diff(got, expected)
                if len(routers) != len(expected_routers):
                    diff = float("inf")  # a router the stages' hooks miss, or one too many
                for mine, theirs in zip(routers, expected_routers):
                    diff = max(diff, _diff(mine.reshape(theirs.shape) if mine.numel() == theirs.numel() else mine, theirs))
                results.append(ProbeResult(tiny.model_type, n, diff))
    except Exception as exc:  # any family's own failure: reported, never a silent pass
        raise ValueError(
            f"model type '{model_type}' is not in the proven family matrix and its parity probe could not run "
            f"({type(exc).__name__}: {exc}); it is refused, since it could not be shown to train on exact numbers"
        ) from None
    return results


def check_model_family(model: nn.Module) -> list[ProbeResult]:
    """Refuse ``model`` (meta tensors are fine: only its class and config are used) unless
    its family is proven or passes :func:`probe_model_family`; returns the probe's results
    ([] for a proven family).

    Raises:
        ValueError: the probe's logits differ beyond :data:`TOLERANCE` (the model type and
            the size of the mismatch named), or the probe could not run.
    """
    model_type = getattr(text_config(model.config), "model_type", None)
    if vision_family(model.config) is not None:  # proven in tests/distributed/test_vlm.py, or refused there
        if model_type not in PROVEN_TEXT_MODEL_TYPES:
            raise ValueError(
                f"model type '{model.config.model_type}' with a '{model_type}' language model is not supported under the "
                f"pipeline: its vision-language stages are proven with {sorted(PROVEN_TEXT_MODEL_TYPES)} language models")
        return []
    if model_type in PROVEN_MODEL_TYPES:
        return []
    results = probe_model_family(type(model), model.config)
    wrong = [r for r in results if not r.exact]
    if wrong:
        worst = max(wrong, key=lambda r: r.max_relative_diff)
        raise ValueError(
            f"model type '{model_type}' ({type(model).__name__}) is not supported under the pipeline: its parity probe "
            f"(a tiny random copy, pipelined at {worst.num_stages} stages against Hugging Face's own forward) differs "
            f"by {worst.max_relative_diff:.3g} of the logits' scale (tolerance {TOLERANCE:g}); the patched stage "
            "forwards miss a step this family takes. Proven families: " + ", ".join(sorted(PROVEN_MODEL_TYPES))
        )
    return results
