"""Copy-and-prune, stage module lists (generated, manual, uneven, invalid) and the
HF-specific helpers, on real tiny models in one process."""

import pytest
import torch
from transformers import LlamaConfig

from nemo_pp.distributed.pipelining.functional import _get_hidden_and_vocab_size, _wrap_stage_forward_to_emit_tensor
from nemo_pp.models.module_tree import copy_pruned
from nemo_pp.models.stage_forward import patch_hf_model_for_pp
from nemo_pp.planning.pipeline import make_pipeline_plan
from nemo_pp.planning.split import generate_hf_model_fqn_per_model_part
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


def stage_names(model, pp, schedule="1F1B", manual=None, **kw):
    return [list(m) for m in make_pipeline_plan(model, pp, schedule, module_fqns_per_model_part=manual, **kw).module_fqns]


def test_uneven_layers_go_to_the_earliest_stages():
    model = tiny_model("llama", layers=5)
    names = stage_names(model, 2)
    assert [sum(".layers." in n for n in s) for s in names] == [3, 2]


def test_auto_split_of_an_hf_model_equals_the_fqn_generator():
    model = tiny_model("llama", layers=8)
    for stages, schedule in ((2, "1f1b"), (4, "interleaved_1f1b")):
        expected = generate_hf_model_fqn_per_model_part(stages, 8, include_multimodal_encoders=False)
        assert [sorted(s) for s in stage_names(model, 2, schedule)] == [sorted(s) for s in expected]


def test_auto_split_of_a_custom_model_covers_its_own_head_and_tail_modules():
    """No FQN list: modules registered before the layer stack go to stage 0, after it to
    the last stage, whatever they are called (examples/custom_model_pipeline.py)."""

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(16, 8)
            self.scale = torch.nn.Identity()  # no parameters: every stage
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])
            self.final_norm = torch.nn.LayerNorm(8)
            self.output_proj = torch.nn.Linear(8, 16)

    names = stage_names(Custom(), 2, "interleaved_1f1b", layers_per_stage=1)
    assert names[0] == ["embedding", "layers.0", "scale"]
    assert names[3] == ["layers.3", "final_norm", "output_proj", "scale"]
    with pytest.raises(ValueError, match="module_fqns_per_model_part"):
        stage_names(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2)


def test_manual_split_is_honoured_and_checked():
    model = tiny_model("llama", layers=4)
    manual = [["model.embed_tokens", "model.layers.0", "model.rotary_emb"],
              ["model.layers.1", "model.layers.2", "model.layers.3", "model.norm", "lm_head", "model.rotary_emb"]]
    assert stage_names(model, 2, manual=manual) == manual
    # the generator's optional modules (vision towers) may be absent; a typo may not
    assert stage_names(model, 2, manual=[manual[0] + ["model.vision_tower"], manual[1]]) == manual
    with pytest.raises(ValueError, match="does not have"):
        stage_names(model, 2, manual=[manual[0] + ["model.embed_tokenz"], manual[1]])
    with pytest.raises(ValueError, match="assigned to stages 0 and 1"):
        stage_names(model, 2, manual=[manual[0] + ["model.layers.1"], manual[1]])
    with pytest.raises(ValueError, match="in no pipeline stage"):
        stage_names(model, 2, manual=[manual[0], manual[1][1:]])
    with pytest.raises(ValueError, match="cannot be spread evenly over pp_size=2"):
        stage_names(model, 2, manual=[manual[0] + manual[1]])


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


def test_activation_checkpointing_needs_a_layer_stack_and_keeps_fqns():
    from nemo_pp.distributed.parallelize import checkpoint_decoder_layers

    model = tiny_model("llama", layers=2)
    names = [n for n, _ in model.named_parameters()]
    assert checkpoint_decoder_layers(model) == 2
    assert checkpoint_decoder_layers(model) == 2  # idempotent: not checkpointed twice
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="distributed.activation_checkpointing: cannot find the decoder layer stack"):
        checkpoint_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_splits_that_would_train_wrong_are_refused():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(16, 8)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
            self.out = torch.nn.Linear(8, 16, bias=False)
            self.out.weight = self.embedding.weight  # a tie the model does not declare

    with pytest.raises(ValueError, match="would be copied to stages \\[0, 1\\] and trained apart"):
        stage_names(Shared(), 2)

    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Module()
            self.enc.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
            self.dec = torch.nn.Module()
            self.dec.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])

    with pytest.raises(ValueError, match="several layer stacks at the same depth"):
        stage_names(TwoStacks(), 2)

    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.zeros(8))
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    with pytest.raises(ValueError, match="belong directly to .*move them into a submodule"):
        stage_names(Direct(), 2)
