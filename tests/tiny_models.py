"""Tiny random Hugging Face models for tests (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config


def tiny_config(arch: str = "llama", tied: bool = False, layers: int = 4, vocab: int = 128, hidden: int = 32):
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, attn_implementation="sdpa",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mixtral":  # a mixture of experts: 4 experts, top 2 (fused 3-D expert weights)
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", tied: bool = False, layers: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied, layers, **kw), dtype=torch.float32)
    # random init leaves some weights at tiny values; a larger spread makes grads sizeable
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
