"""Copy-and-prune, stage module lists (generated, manual, uneven, invalid) and the
HF-specific helpers, on real tiny models in one process."""

import pytest
import torch
from transformers import LlamaConfig

from nemo_pp.distributed.pipelining.functional import _get_hidden_and_vocab_size, _wrap_stage_forward_to_emit_tensor
from nemo_pp.distributed.pipelining.hf_utils import patch_hf_model_for_pp
from nemo_pp.distributed.pipelining.split import copy_pruned, stage_module_names
from tests.tiny_models import tiny_model


def test_copy_pruned_keeps_original_fqns_and_copies_only_kept_modules():
    model = tiny_model("llama", tied=True, layers=4)
    stage = copy_pruned(model, ["model.layers.2", "model.layers.3", "model.norm", "lm_head", "model.rotary_emb"])
    names = {n for n, _ in stage.named_parameters()}
    assert "model.layers.2.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in names)
    assert isinstance(stage.model.layers, torch.nn.ModuleDict) and list(stage.model.layers.keys()) == ["2", "3"]
    assert stage.model.embed_tokens is None
    # a copy: the original is untouched and shares no storage
    assert stage.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert len(model.model.layers) == 4


def test_uneven_layers_go_to_the_earliest_stages():
    model = tiny_model("llama", layers=5)
    names = stage_module_names(model, 2, "1F1B")
    assert [sum(".layers." in n for n in s) for s in names] == [3, 2]


def test_manual_split_is_honoured_and_checked():
    model = tiny_model("llama", layers=4)
    manual = [["model.embed_tokens", "model.layers.0", "model.rotary_emb"],
              ["model.layers.1", "model.layers.2", "model.layers.3", "model.norm", "lm_head", "model.rotary_emb"]]
    assert stage_module_names(model, 2, "1F1B", manual) == manual
    with pytest.raises(ValueError, match="does not have"):
        stage_module_names(model, 2, "1F1B", [manual[0] + ["model.vision_tower"], manual[1]])
    with pytest.raises(ValueError, match="assigned to stages 0 and 1"):
        stage_module_names(model, 2, "1F1B", [manual[0] + ["model.layers.1"], manual[1]])
    with pytest.raises(ValueError, match="in no pipeline stage"):
        stage_module_names(model, 2, "1F1B", [manual[0], manual[1][1:]])
    with pytest.raises(ValueError, match="not a multiple of pp_size"):
        stage_module_names(model, 2, "1F1B", [manual[0] + manual[1]])


def test_patched_stages_chain_to_the_full_model_logits():
    model = tiny_model("qwen2", tied=False, layers=4).eval()
    ids = torch.randint(0, 128, (2, 12))
    first = copy_pruned(model, ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.rotary_emb"])
    last = copy_pruned(model, ["model.layers.2", "model.layers.3", "model.norm", "lm_head", "model.rotary_emb"])
    for stage in (first, last):
        patch_hf_model_for_pp(stage)
    with torch.no_grad():
        hidden = first(ids)
        assert hidden.shape == (2, 12, 32)  # stage 0: token ids -> hidden states
        logits = last(hidden)
        torch.testing.assert_close(logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert last(hidden, logits_to_keep=3).shape == (2, 3, 128)


def test_wrap_stage_forward_unwraps_model_outputs():
    model = tiny_model("llama", layers=2).eval()
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        _wrap_stage_forward_to_emit_tensor(model)
        out = model(input_ids=ids)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected)


def test_hidden_and_vocab_size_flat_and_nested():
    assert _get_hidden_and_vocab_size(LlamaConfig(hidden_size=48, vocab_size=99, num_attention_heads=4)) == (48, 99)

    class VLMConfig:
        text_config = LlamaConfig(hidden_size=64, vocab_size=77, num_attention_heads=4)

    assert _get_hidden_and_vocab_size(VLMConfig()) == (64, 77)
    with pytest.raises(ValueError, match="hidden_size and vocab_size"):
        _get_hidden_and_vocab_size(object())
