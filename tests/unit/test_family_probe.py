"""Exact or refused (nemo_pp.planning.family_probe): a family outside the proven matrix is
probed against Hugging Face's forward on a tiny random copy, in one process."""

from __future__ import annotations

import json

import pytest
import transformers
from transformers import AutoConfig

from nemo_pp.planning.family_probe import PROVEN_MODEL_TYPES, check_model_family, probe_model_family, tiny_config
from tests.helpers import FAMILIES


def _meta_model(model_type: str, **fields):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from nemo_pp.models.loading import empty_model

    config = AutoConfig.for_model(model_type, **fields)
    model = empty_model(config)
    assert type(model).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return model


def test_the_proven_list_is_the_family_matrix():
    assert PROVEN_MODEL_TYPES == set(FAMILIES)


def test_a_family_the_stage_forwards_get_wrong_is_refused_naming_it_and_the_mismatch():
    # Doge: the stage forwards do not reproduce its forward (measured: 0.87 of the logits'
    # scale at 2 stages); without the probe it would train on such numbers without a word
    model = _meta_model("doge")
    with pytest.raises(ValueError, match=r"model type 'doge' \(DogeForCausalLM\) is not supported .* differs by 0\.\d+"):
        check_model_family(model)


@pytest.mark.parametrize("model_type", ["phi", "olmo"])
def test_the_families_the_probe_caught_are_exact_now(model_type):
    """Phi's decoder ends in ``final_layernorm``, which the stage forwards used to skip (a
    loss of 806.9 where Hugging Face gave 3143.0); OLMo's final LayerNorm has no weights, so
    the split put it on every stage like a rotary embedding and every stage normalised what
    it sent on. Both are fixed, and both are in the matrix now."""
    cls = getattr(transformers, {"phi": "PhiForCausalLM", "olmo": "OlmoForCausalLM"}[model_type])
    results = probe_model_family(cls, AutoConfig.for_model(model_type))
    assert [r.num_stages for r in results] == [2, 4] and all(r.exact for r in results), results


def test_a_family_whose_tiny_copy_cannot_run_is_refused_not_passed():
    model = _meta_model("gpt2")  # no layer stack named 'layers'
    with pytest.raises(ValueError, match=r"'gpt2' is not in the proven family matrix and its parity probe could not run"):
        check_model_family(model)


def test_proven_families_are_not_probed():
    assert check_model_family(_meta_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=4, vocab_size=128)) == []


def test_tiny_config_keeps_the_architecture_and_shrinks_the_sizes():
    config = AutoConfig.for_model("gemma3_text")
    tiny = tiny_config(config)
    assert tiny.model_type == "gemma3_text" and tiny.num_hidden_layers == 4 and tiny.hidden_size == 64
    assert tiny.layer_types == config.layer_types[:4] and tiny.sliding_window == 8
    assert tiny.final_logit_softcapping == config.final_logit_softcapping
    assert config.num_hidden_layers != 4  # the original is left alone


def test_check_model_cli_prints_the_probe_and_exits_by_its_verdict(tmp_path, capsys):
    from nemo_pp.cli import main

    for model_type, code in (("phi", 0), ("doge", 2)):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(AutoConfig.for_model(model_type).to_dict()))
        # a shipped config with another model, overridden as for the recipe (no weights needed)
        assert main(["check-model", "--config", "smollm2_135m_squad_pp2",
                     f"--model.pretrained_model_name_or_path={folder}"]) == code
        out = capsys.readouterr().out
        assert f"{model_type} (" in out and "at 2 stages" in out and "at 4 stages" in out
        assert ("exact" if code == 0 else "WRONG") in out


def test_the_probe_compares_the_router_logits_an_moe_stage_captures():
    """PhiMoE (outside the matrix) passes: its stages' router hooks see exactly Hugging Face's
    recorded ``router_logits``. A recorder pointing at the wrong output (the routing scores,
    not the logits) is caught, so a family whose load-balancing loss would be formed from the
    wrong tensor is refused."""
    from transformers.models.phimoe import modeling_phimoe

    results = probe_model_family(modeling_phimoe.PhimoeForCausalLM, AutoConfig.for_model("phimoe"))
    assert all(r.exact for r in results), results

    from transformers.utils.output_capturing import OutputRecorder

    class WrongRecorder(modeling_phimoe.PhimoeForCausalLM):
        _can_record_outputs = {**modeling_phimoe.PhimoeForCausalLM._can_record_outputs,
                               "router_logits": OutputRecorder(modeling_phimoe.PhimoeTopKRouter, index=1)}

    WrongRecorder.__module__ = modeling_phimoe.__name__
    results = probe_model_family(WrongRecorder, AutoConfig.for_model("phimoe"))
    assert not any(r.exact for r in results), results
