"""A real mixture of experts to fine-tune offline: SmolLM2-135M-Instruct, sparsely upcycled.

Sparse upcycling (Komatsuzaki et al., 2022, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints"): every MLP of the dense model becomes ``E`` experts that start as
copies of it, and a router per layer is freshly initialised. SmolLM2 is a Llama, and a
Mixtral is a Llama whose MLPs are routed experts, so the upcycled model is a
``MixtralForCausalLM`` of SmolLM2's shape (576 hidden, 30 layers, 9 heads / 3 kv heads,
tied embeddings) with 4 experts and top-2 routing: 375 M parameters, about 200 M active.

Mixtral renormalises the top-k routing weights to sum to 1, so at initialisation each layer
computes ``sum_k w_k * MLP(x) = MLP(x)``: the upcycled model's logits equal the dense model's
(checked when the folder is built). Fine-tuning then lets the copies drift apart, and the
router's load-balancing loss (``output_router_logits: true``, set in the config) keeps the
routing from collapsing onto a few of them. Never committed: ``python -m nemo_pp.assets``
builds it from the dense folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from nemo_pp.assets.paths import _commit_dir, _dir_size, _fresh_tmp_dir, assets_home, is_complete

#: experts per layer and experts per token of the upcycled model
NUM_EXPERTS = 4
TOP_K = 2
#: Switch Transformer's coefficient (Fedus et al., 2021); Mixtral's config default is 0.001
ROUTER_AUX_LOSS_COEF = 0.01
#: the fresh router's init: transformers' ``initializer_range`` (normal, std 0.02)
ROUTER_INIT_STD = 0.02
#: largest |upcycled - dense| logit accepted by the build's check (float32 rounding of w1*y + w2*y)
LOGITS_ATOL = 1e-3


def smollm2_moe_dir() -> Path:
    """HF folder of the upcycled SmolLM2 (``MixtralForCausalLM``, float32, tied embeddings)."""
    return assets_home() / "models" / f"SmolLM2-135M-Instruct-{NUM_EXPERTS}x-top{TOP_K}-upcycled"


def upcycle_llama_to_mixtral(dense, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, seed: int = 0):
    """The sparse upcycle of a ``LlamaForCausalLM`` (any size) as a ``MixtralForCausalLM``.

    Args:
        dense: the dense Llama model (float32).
        num_experts / top_k: ``E`` and the experts each token goes to.
        seed: seeds the routers' normal(0, ``ROUTER_INIT_STD``) init.

    Returns:
        the Mixtral model: attention, norms and embeddings copied; experts ``e`` of layer
        ``l``: ``gate_up_proj[e] = cat(gate_proj, up_proj)``, ``down_proj[e] = down_proj`` of
        the dense layer ``l``; ``output_router_logits`` on.

    Raises:
        ValueError: the dense model is not a Llama with a SiLU MLP and no biases.
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    if c.model_type != "llama" or getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ValueError(f"sparse upcycling here needs a Llama without biases, got model type '{c.model_type}'")
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        sliding_window=None, attention_dropout=0.0, num_local_experts=num_experts, num_experts_per_tok=top_k,
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF, output_router_logits=True, router_jitter_noise=0.0,
        initializer_range=c.initializer_range, use_cache=True,
    )
    moe = MixtralForCausalLM(config).to(torch.float32)
    dense_state = dense.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".mlp.gate." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * ROUTER_INIT_STD)
            elif name.endswith("mlp.experts.gate_up_proj"):
                prefix = name.removesuffix("experts.gate_up_proj")
                fused = torch.cat([dense_state[prefix + "gate_proj.weight"], dense_state[prefix + "up_proj.weight"]])
                p.copy_(fused.unsqueeze(0).expand_as(p))
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name.removesuffix("experts.down_proj")
                p.copy_(dense_state[prefix + "down_proj.weight"].unsqueeze(0).expand_as(p))
            else:
                p.copy_(dense_state[name])
    moe.tie_weights()
    return moe


def prepare_smollm2_moe(force: bool = False) -> Path:
    """Build the upcycled SmolLM2 into :func:`smollm2_moe_dir` from the dense folder
    (prepared first when missing); a no-op when complete and not ``force``.

    Raises:
        RuntimeError: the upcycled model's logits differ from the dense model's by more
            than :data:`LOGITS_ATOL`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_pp.assets.smollm2 import prepare_smollm2

    final = smollm2_moe_dir()
    if is_complete(final) and not force:
        print(f"[assets] upcycled model ready: {final}", flush=True)
        return final
    dense_dir = prepare_smollm2()
    t0 = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    print(f"[assets] upcycling {dense_dir.name}: {NUM_EXPERTS} experts per layer (copies of its MLP), top-{TOP_K}, "
          "fresh routers", flush=True)
    moe = upcycle_llama_to_mixtral(dense).eval()
    tok = AutoTokenizer.from_pretrained(dense_dir)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = float((moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max())
    if diff > LOGITS_ATOL:
        raise RuntimeError(f"the upcycled model's logits differ from the dense model's by {diff:.3g} (> {LOGITS_ATOL})")
    tmp = _fresh_tmp_dir(final)
    try:
        moe.save_pretrained(tmp)  # transformers' own layout: experts one by one
        tok.save_pretrained(tmp)
        params = sum(p.numel() for p in moe.parameters())
        _commit_dir(tmp, final, {"source": str(dense_dir), "method": "sparse upcycling (Komatsuzaki et al., 2022)",
                                 "num_experts": NUM_EXPERTS, "top_k": TOP_K, "parameters": params,
                                 "max_abs_logit_diff_vs_dense": diff})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[assets] upcycled model saved to {final} ({_dir_size(final) / 2**20:.1f} MiB, {params / 1e6:.0f} M "
          f"parameters; logits within {diff:.1e} of the dense model) in {time.perf_counter() - t0:.1f} s", flush=True)
    return final
