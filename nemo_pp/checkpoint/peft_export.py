"""What a LoRA run writes for the outside world: a PEFT adapter folder that
``peft.PeftModel.from_pretrained(base_model, folder)`` loads, and the merged weights
``W + (alpha / r) * B @ A`` for a plain Hugging Face folder.

The adapter folder holds ``adapter_config.json`` (``peft.LoraConfig.save_pretrained``)
and ``adapter_model.safetensors`` with peft's key names
(``base_model.model.<module FQN>.lora_A.weight``: the adapter name is dropped, as
``peft.get_peft_model_state_dict`` does). Each pp rank holds the adapters of its stages;
rank 0 gathers them (they are small: r * (in + out) values per module) and writes one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from nemo_pp._peft.lora import ADAPTER_NAME, PeftConfig, lora_modules
from nemo_pp.checkpoint.hf_export import full_cpu
from nemo_pp.checkpoint.layout import write_folder_checksums

PEFT_PREFIX = "base_model.model."  # what peft.PeftModel puts before the wrapped model's FQNs


def adapter_state_dict(model_parts: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's adapter weights as full CPU tensors under peft's saved names.

    Collective over the data-parallel mesh when the parts are FSDP2-sharded."""
    out = {}
    for part in model_parts:
        for fqn, module in lora_modules(part).items():
            for which in ("lora_A", "lora_B"):
                weight = getattr(module, which)[ADAPTER_NAME].weight
                out[f"{PEFT_PREFIX}{fqn}.{which}.weight"] = full_cpu(weight)
    return out



def save_peft_adapter(
    out_dir: str | Path,
    model_parts: Sequence[nn.Module],
    cfg: PeftConfig,
    base_model_name_or_path: str | None = None,
    is_writer: bool = True,
) -> Path:
    """Write the PEFT adapter folder of every pp rank's adapters (collective over all ranks).

    Args:
        out_dir: destination folder (created).
        model_parts: this rank's stage modules, adapted by :func:`~nemo_pp._peft.lora.apply_lora`.
        cfg: the run's ``peft:`` settings (rank, alpha, dropout).
        base_model_name_or_path: recorded in ``adapter_config.json`` for ``AutoPeftModelForCausalLM``.
        is_writer: False on data-parallel replicas (dp_rank != 0): they join the gathers only.

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file

    state = adapter_state_dict(model_parts)
    mine = state if is_writer else {}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    out = Path(out_dir)
    if gathered is not None:
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part or {})
        targets = sorted({k[len(PEFT_PREFIX):].rsplit(".", 2)[0] for k in merged})
        out.mkdir(parents=True, exist_ok=True)
        save_file(dict(sorted(merged.items())), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg.lora_config(targets, base_model_name_or_path).save_pretrained(str(out))  # adapter_config.json
        write_folder_checksums(out)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out

