"""Consolidated Hugging Face export of a (pipelined) model.

Stage parameters keep their original FQNs (``model.layers.<i>...``), so each pp
rank writes its own safetensors shard and rank 0 writes the index, config and
tokenizer: the result is a normal HF folder that
``AutoModelForCausalLM.from_pretrained`` loads, at any pp size. Tensors are in the family's
checkpoint layout, as ``save_pretrained`` writes them (a Mixtral's experts one by one:
:mod:`nemo_pp.models.weight_conversion`). A tied embedding is
stored once (``model.embed_tokens.weight``); ``tie_word_embeddings`` in the config
re-ties it on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from nemo_pp._peft.lora import merge_lora_weights
from nemo_pp.checkpoint.layout import write_folder_checksums
from nemo_pp.models.weight_conversion import checkpoint_layout_state


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A whole, contiguous CPU copy of ``t`` without autograd history; an FSDP2 / TP DTensor
    is gathered first (collective over its mesh)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().contiguous()


def stage_state_dict(model_parts: Sequence[nn.Module], tied_head_fqn: str | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of this rank's parts, by original FQN, without
    ``tied_head_fqn`` (the output-projection copy of a tied embedding). LoRA adapters
    are merged into their base weights (``nemo_pp._peft.lora.merge_lora_weights``)."""
    out: dict[str, torch.Tensor] = {}
    for part in model_parts:
        state: dict[str, torch.Tensor] = {}
        for name, p in part.named_parameters(remove_duplicate=False):
            if name == tied_head_fqn:
                continue
            state[name] = full_cpu(p)
        for name, b in part.named_buffers():
            if "rotary_emb" in name or name in state:
                continue  # derived from the config, not stored by HF
            state[name] = full_cpu(b)
        out.update(merge_lora_weights(state, part))
    return out


def save_consolidated_hf(
    out_dir: str | Path,
    model_parts: Sequence[nn.Module],
    config,
    tokenizer=None,
    tied: bool = False,
    tied_head_fqn: str = "lm_head.weight",
    pp_rank: int = 0,
    pp_size: int = 1,
    is_writer: bool = True,
) -> Path:
    """Write a Hugging Face model folder from every pp rank's parts (collective).

    Args:
        out_dir: destination folder.
        model_parts: this rank's stage modules.
        config: the HF config (saved as ``config.json``).
        tokenizer: saved beside the weights when given.
        tied: the embedding is tied: store it once, without ``tied_head_fqn``.
        pp_rank, pp_size: this rank's pipeline coordinate; shard ``pp_rank`` of ``pp_size``.
        is_writer: False on data-parallel replicas (dp_rank != 0): they join the
            gathers but write nothing.

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = stage_state_dict(model_parts, tied_head_fqn if tied else None)
    family = _hf_model_of(model_parts)
    if family is not None:  # the layout save_pretrained writes (Mixtral: per-expert w1/w2/w3)
        state = checkpoint_layout_state(family, state)
    shard = "model.safetensors" if pp_size == 1 else f"model-{pp_rank + 1:05d}-of-{pp_size:05d}.safetensors"
    if is_writer:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / shard), metadata={"format": "pt"})
    names = {k: (shard, v.numel() * v.element_size()) for k, v in state.items()} if is_writer else {}
    gathered: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, names)
    else:
        gathered = [names]
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return out
    weight_map, total = {}, 0
    for d in gathered:
        for k, (file, nbytes) in (d or {}).items():
            if k not in weight_map:
                weight_map[k] = file
                total += nbytes
    if pp_size > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = _copy_config(config, tied)
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_folder_checksums(out)  # every writer's shard is on disk: they wrote before the gather
    if dist.is_initialized():
        dist.barrier()
    return out


def _hf_model_of(model_parts: Sequence[nn.Module]):
    """The first transformers model among the parts (inside a LoRA wrapper too), or None."""
    from transformers import PreTrainedModel

    return next((m for part in model_parts for m in part.modules() if isinstance(m, PreTrainedModel)), None)


def _copy_config(config, tied: bool):
    import copy

    cfg = copy.deepcopy(config)
    cfg.tie_word_embeddings = bool(tied)
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = bool(tied)
    return cfg
