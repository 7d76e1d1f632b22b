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


# ---------------------------------------------------------------------------------------------
# tiny vision-language models: 4 decoder layers, a 2-layer vision encoder, 16x16 images

VLM_TEXT = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
#: the image token of every tiny vision-language model (inside the vocabulary)
VLM_IMAGE_TOKEN = 150


def tiny_vlm_config(model_type: str):
    """A tiny random config of a vision-language family (``llava``, ``qwen2_vl``, ``gemma3``, ``idefics3``)."""
    import transformers

    if model_type == "llava":  # CLIP: 16 patches + CLS, the CLS dropped ("default"), 16 tokens per image
        return transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(image_size=16, patch_size=4, **_VISION),
            text_config=transformers.LlamaConfig(**VLM_TEXT), image_token_id=VLM_IMAGE_TOKEN)
    if model_type == "qwen2_vl":  # 2x2 patches, 2x2 merge: an image of grid (1, h, w) is h*w/4 tokens
        return transformers.Qwen2VLConfig(
            text_config=dict(model_type="qwen2_vl_text", **VLM_TEXT, bos_token_id=1, eos_token_id=2, rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])),
            vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                               temporal_patch_size=2, in_channels=3),
            image_token_id=VLM_IMAGE_TOKEN, video_token_id=151, vision_start_token_id=152)
    if model_type == "gemma3":  # SigLIP 16 patches pooled to 4 tokens per image; tied embeddings
        return transformers.Gemma3Config(
            text_config=dict(model_type="gemma3_text", **VLM_TEXT, head_dim=8, sliding_window=8),
            vision_config=dict(model_type="siglip_vision_model", image_size=16, patch_size=4, **_VISION),
            mm_tokens_per_image=4, image_token_index=VLM_IMAGE_TOKEN, boi_token_index=151, eoi_token_index=152)
    if model_type == "idefics3":  # SigLIP 16 patches, pixel shuffle by 2: 4 tokens per image
        return transformers.Idefics3Config(
            text_config=dict(model_type="llama", **VLM_TEXT), vision_config=dict(image_size=16, patch_size=4, **_VISION),
            scale_factor=2, image_token_id=VLM_IMAGE_TOKEN)
    raise ValueError(model_type)


def tiny_vlm(model_type: str, seed: int = 0):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = tiny_vlm_config(model_type)
    config._attn_implementation = "sdpa"
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
