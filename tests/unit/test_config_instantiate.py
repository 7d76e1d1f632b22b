"""nemo_pp.config: `_target_` instantiation, allowlist, import checks, save_config."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import nemo_pp.config as config_pkg
from nemo_pp.config import ConfigError, config_to_yaml, instantiate, load_config, save_config, validate_targets


def _cfg(text: str):
    return OmegaConf.create(yaml.safe_load(text))


# --- instantiate ---------------------------------------------------------------------------


def test_instantiate_optimizer_with_params_kwarg():
    cfg = _cfg("optimizer: {_target_: torch.optim.AdamW, lr: 0.001, betas: [0.8, 0.9]}")
    model = torch.nn.Linear(3, 2)
    opt = instantiate(cfg.optimizer, params=model.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["lr"] == 0.001 and tuple(group["betas"]) == (0.8, 0.9)
    assert sum(p.numel() for p in group["params"]) == 3 * 2 + 2


def test_instantiate_nested_targets_and_plain_containers():
    cfg = _cfg(
        """
        model:
          _target_: torch.nn.Sequential
          _args_:
            - {_target_: torch.nn.Linear, in_features: 4, out_features: 3}
            - {_target_: torch.nn.ReLU}
            - {_target_: torch.nn.Linear, in_features: 3, out_features: 1, bias: false}
        """
    )
    model = instantiate(cfg.model)
    assert isinstance(model[0], torch.nn.Linear) and model[2].bias is None
    assert model(torch.zeros(2, 4)).shape == (2, 1)


def test_instantiate_converts_to_plain_python_containers(monkeypatch):
    monkeypatch.setenv("NEMO_PP_TARGET_ALLOWLIST", "builtins.dict")
    out = instantiate(_cfg("x: {_target_: builtins.dict, a: [1, 2], b: {c: 3}}").x)
    assert type(out["a"]) is list and type(out["b"]) is dict


def test_instantiate_accepts_plain_dict_and_does_not_modify_node():
    node = {"_target_": "nemo_automodel.components.config.errors.ConfigError", "_args_": ["boom"]}
    err = instantiate(node)
    assert isinstance(err, ConfigError) and str(err) == "boom"
    assert node["_target_"].startswith("nemo_automodel.")


def test_instantiate_resolves_interpolations():
    cfg = _cfg("dims: {i: 5}\nmodel: {_target_: torch.nn.Linear, in_features: '${dims.i}', out_features: 2}")
    assert instantiate(cfg.model).in_features == 5


# --- NeMo AutoModel prefix rewrite -----------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["nemo_automodel.components.config.errors.ConfigError", "nemo_automodel.config.errors.ConfigError"],
)
def test_nemo_automodel_prefix_rewritten(target, caplog):
    cfg = _cfg(f"err: {{_target_: {target}, _args_: [hello]}}")
    with caplog.at_level(logging.INFO, logger="nemo_pp.config"):
        validate_targets(cfg)
        err = instantiate(cfg.err)
    assert type(err) is ConfigError and str(err) == "hello"
    assert cfg.err._target_ == target  # the config itself keeps what the user wrote
    rewrites = [r for r in caplog.records if "rewritten" in r.getMessage() and target in r.getMessage()]
    assert len(rewrites) <= 1  # at most once per process (an earlier test may have logged it)


def test_rewrite_logged_once(caplog):
    target = "nemo_automodel.components.config.keys.get_dotted_keys"
    cfg = _cfg(f"a: {{_target_: {target}, cfg: {{x: 1}}}}")
    with caplog.at_level(logging.INFO, logger="nemo_pp.config"):
        assert instantiate(cfg.a) == ["x"]
        assert instantiate(cfg.a) == ["x"]
        validate_targets(cfg)
    assert sum("rewritten" in r.getMessage() for r in caplog.records) == 1


# --- allowlist -----------------------------------------------------------------------------


def test_allowlist_rejects_os_system():
    cfg = _cfg("model: {_target_: os.system, command: 'echo pwned'}")
    with pytest.raises(ConfigError) as info:
        instantiate(cfg.model)
    msg = str(info.value)
    assert "model._target_" in msg and "'os.system'" in msg and "NEMO_PP_TARGET_ALLOWLIST=os" in msg
    with pytest.raises(ConfigError, match=r"model\._target_"):
        validate_targets(cfg)


def test_allowlist_checked_for_whole_tree_before_any_call(capsys):
    seed_before = torch.initial_seed()
    cfg = _cfg(
        """
        steps:
          - {_target_: torch.manual_seed, seed: 1234}
          - {_target_: builtins.print, _args_: [executed]}
        """
    )
    with pytest.raises(ConfigError, match=r"steps\[1\]\._target_.*builtins\.print"):
        instantiate(cfg.steps)
    assert torch.initial_seed() == seed_before  # the allowed first element never ran
    assert "executed" not in capsys.readouterr().out


def test_allowlist_checks_kwargs_too():
    cfg = _cfg("opt: {_target_: torch.optim.SGD, lr: 0.1}")
    with pytest.raises(ConfigError, match=r"opt\.params\._target_.*os\.getcwd"):
        instantiate(cfg.opt, params={"_target_": "os.getcwd"})


def test_allowlist_env_var_extends(monkeypatch):
    cfg = _cfg("x: {_target_: builtins.len, _args_: [[1, 2, 3]]}")
    monkeypatch.delenv("NEMO_PP_TARGET_ALLOWLIST", raising=False)
    with pytest.raises(ConfigError, match="not in the allowlist"):
        instantiate(cfg.x)
    monkeypatch.setenv("NEMO_PP_TARGET_ALLOWLIST", "collections, builtins.len")
    assert instantiate(cfg.x) == 3


def test_allowlist_matches_whole_components(monkeypatch):
    monkeypatch.setenv("NEMO_PP_TARGET_ALLOWLIST", "builtins.le")
    with pytest.raises(ConfigError, match="not in the allowlist"):
        validate_targets(_cfg("x: {_target_: builtins.len}"))


# --- import checks without running ---------------------------------------------------------


def test_unimportable_target_suggests_close_name():
    cfg = _cfg("optimizer: {_target_: torch.optim.AdamX, lr: 0.1}")
    with pytest.raises(ConfigError) as info:
        validate_targets(cfg)
    msg = str(info.value)
    assert msg.startswith("optimizer._target_: cannot import target 'torch.optim.AdamX'")
    assert "has no attribute 'AdamX'" in msg and "'torch.optim.AdamW'" in msg


def test_unimportable_module_reports_import_error():
    cfg = _cfg("model: {_target_: nemo_pp.no_such_module.Thing}")
    with pytest.raises(
        ConfigError, match=r"model\._target_.*nemo_pp\.no_such_module\.Thing.*no attribute 'no_such_module'"
    ):
        validate_targets(cfg)


def test_rewritten_unimportable_target_names_both_forms():
    cfg = _cfg("a: {b: {_target_: nemo_automodel.components.config.ConfigErrorr}}")
    with pytest.raises(ConfigError) as info:
        validate_targets(cfg)
    msg = str(info.value)
    assert "a.b._target_" in msg and "'nemo_pp.config.ConfigErrorr'" in msg
    assert "rewritten from 'nemo_automodel.components.config.ConfigErrorr'" in msg
    assert "'nemo_pp.config.ConfigError'" in msg


def test_validate_attribute_chain_on_lazy_module():
    ok = _cfg("model: {_target_: transformers.AutoModelForCausalLM.from_pretrained}")
    validate_targets(ok)  # module `transformers`, attributes `AutoModelForCausalLM.from_pretrained`
    bad = _cfg("model: {_target_: transformers.AutoModelForCausalLM.from_pretrainedd}")
    with pytest.raises(ConfigError, match="did you mean 'transformers.AutoModelForCausalLM.from_pretrained'"):
        validate_targets(bad)


def test_validate_targets_on_loaded_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {_target_: torch.nn.Linear, in_features: 2, out_features: 2}\nsub: {x: 1}\n")
    cfg = load_config(path, ["--model._target_", "torch.nn.Linearr"])
    with pytest.raises(ConfigError, match=r"model\._target_.*did you mean 'torch\.nn\.Linear'"):
        validate_targets(cfg)
    validate_targets(load_config(path))


# --- errors raised by the target itself ------------------------------------------------------


def test_type_error_gets_key_path():
    cfg = _cfg("optimizer: {_target_: torch.optim.AdamW, lrr: 0.1}")
    with pytest.raises(ConfigError) as info:
        instantiate(cfg.optimizer, params=torch.nn.Linear(2, 2).parameters())
    msg = str(info.value)
    assert msg.startswith("while instantiating 'optimizer' (torch.optim.AdamW): TypeError:")
    assert "lrr" in msg
    assert isinstance(info.value.__cause__, TypeError)


def test_nested_type_error_names_nested_key():
    cfg = _cfg("model: {_target_: torch.nn.Sequential, _args_: [{_target_: torch.nn.Linear, in_features: 2}]}")
    with pytest.raises(
        ConfigError, match=r"while instantiating 'model\._args_\[0\]' \(torch\.nn\.Linear\): TypeError: .*out_features"
    ):
        instantiate(cfg.model)


def test_value_error_wrapped():
    cfg = _cfg("optimizer: {_target_: torch.optim.SGD, lr: -1.0}")
    with pytest.raises(ConfigError, match=r"'optimizer' \(torch\.optim\.SGD\): ValueError: Invalid learning rate"):
        instantiate(cfg.optimizer, params=torch.nn.Linear(2, 2).parameters())


def test_other_errors_keep_their_type_with_note(tmp_path):
    cfg = _cfg(f"ckpt: {{_target_: torch.load, f: '{tmp_path}/missing.pt'}}")
    with pytest.raises(FileNotFoundError) as info:
        instantiate(cfg.ckpt)
    assert any("'ckpt' (torch.load)" in note for note in getattr(info.value, "__notes__", []))


# --- save_config ----------------------------------------------------------------------------


def test_save_config_round_trip_includes_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_PP_HOME", "/scratch/pp")
    src = tmp_path / "c.yaml"
    src.write_text(
        "home: ${oc.env:NEMO_PP_HOME,/tmp}\n"
        "distributed: {pp_size: 1, pipeline: {_target_: nemo_pp.distributed.pipelining.AutoPipeline}}\n"
        "dataloader: {batch_size: 8}\n"
        "derived: ${dataloader.batch_size}\n"
    )
    cfg = load_config(src, ["--distributed.pp_size", "2", "--dataloader.batch_size=4", "+extra.lr=1e-4"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    effective = OmegaConf.to_container(cfg, resolve=True)
    monkeypatch.delenv("NEMO_PP_HOME")  # the saved file must not depend on the environment
    again = load_config(out)
    assert OmegaConf.to_container(again) == effective
    assert again.home == "/scratch/pp" and again.derived == 4 and again.distributed.pp_size == 2
    assert isinstance(again.extra.lr, float)
    assert "${" not in out.read_text()


def test_config_to_yaml_resolves():
    text = config_to_yaml(_cfg("a: 1\nb: '${a}'"))
    assert yaml.safe_load(text) == {"a": 1, "b": 1}


def test_save_config_unresolvable_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="b"):
        save_config(_cfg("b: '${nowhere}'"), tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_save_config_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "config.yaml"
    out.write_text("old: 1\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_config(_cfg("new: 2"), out)
    assert out.read_text() == "old: 1\n"  # never half-written
    assert list(tmp_path.iterdir()) == [out]  # the temporary file is gone
    monkeypatch.undo()
    save_config(_cfg("new: 2"), out)
    assert yaml.safe_load(out.read_text()) == {"new": 2} and list(tmp_path.iterdir()) == [out]


def test_public_api_exported():
    for name in ("load_config", "parse_cli", "instantiate", "validate_targets", "save_config",
                 "config_to_yaml", "ConfigError", "get_dotted_keys"):  # fmt: skip
        assert name in config_pkg.__all__ and hasattr(config_pkg, name)
