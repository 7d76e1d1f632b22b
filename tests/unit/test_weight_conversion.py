"""Checkpoint layout vs module layout (nemo_pp.models.weight_conversion): a mixture of experts
saved by ``save_pretrained`` (experts one by one) loads stage by stage into the fused experts
of transformers 5, a checkpoint already in the fused layout loads too, and the export writes
exactly the tensors ``save_pretrained`` writes and reloads to the same logits."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import MOE_FAMILIES, family_model


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _load_stage(folder, layers):
    from transformers import AutoConfig

    from nemo_pp.models.loading import SafetensorsCheckpoint, empty_model, materialize
    from nemo_pp.models.module_tree import copy_pruned

    meta = empty_model(AutoConfig.from_pretrained(folder))
    checkpoint = SafetensorsCheckpoint.for_model(folder, meta)
    assert checkpoint.check_covers(meta) == []
    part = copy_pruned(meta, ["model.embed_tokens", "model.rotary_emb", *(f"model.layers.{i}" for i in layers)])
    materialize(part, torch.device("cpu"))
    checkpoint.load_into(part)
    return part


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_an_moe_checkpoint_in_either_layout_loads_per_stage_and_exports_as_save_pretrained(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_pp.checkpoint.hf_export import save_consolidated_hf

    model = family_model(model_type).eval()
    hub, fused, export = tmp_path / "hub", tmp_path / "fused", tmp_path / "export"
    model.save_pretrained(hub)
    assert not any("experts.gate_up_proj" in k for k in _keys(hub))  # the per-expert layout on disk
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
               not model.config.tie_word_embeddings}, str(fused / "model.safetensors"))
    model.config.save_pretrained(fused)
    expected = dict(model.named_parameters())
    for folder in (hub, fused):
        part = _load_stage(folder, [1, 2])
        for name, p in part.named_parameters():
            assert torch.equal(p, expected[name]), (folder.name, name)

    save_consolidated_hf(export, [model], model.config, tied=False)
    assert _keys(export) == _keys(hub)
    reloaded = AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
