"""nemo_pp.config: YAML loading, env interpolation, defaults, Hydra-grammar overrides, parse_cli."""

from __future__ import annotations

import math
import re
import textwrap

import pytest
from omegaconf import DictConfig, OmegaConf

from nemo_pp.config import ConfigError, get_dotted_keys, load_config, parse_cli

BASE_YAML = """
distributed:
  strategy: fsdp2
  pp_size: 1
  tp_size: 1
  pipeline:
    _target_: nemo_automodel.components.distributed.pipelining.AutoPipeline
    pp_schedule: 1f1b
    round_virtual_stages_to_pp_multiple: up
    scale_grads_in_schedule: false
    layers_per_stage: null
model:
  _target_: torch.nn.Linear
  in_features: 4
  out_features: 2
optimizer:
  _target_: torch.optim.AdamW
  lr: 1e-5
  betas: [0.9, 0.95]
dataloader:
  batch_size: 8
  shuffle: true
  stages: [{name: a}, {name: b}]
checkpoint:
  dir: ${oc.env:NEMO_PP_HOME,${oc.env:HOME}/.cache/nemo_pp}/ckpt
"""


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str = BASE_YAML, name: str = "cfg.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def base(write_yaml):
    return write_yaml()


# --- loading and interpolation ---------------------------------------------------------


def test_load_plain_yaml(base):
    cfg = load_config(base)
    assert isinstance(cfg, DictConfig)
    assert cfg.distributed.pp_size == 1
    assert cfg.distributed.pipeline.layers_per_stage is None
    assert cfg.optimizer.lr == pytest.approx(1e-5) and isinstance(cfg.optimizer.lr, float)
    assert cfg.distributed.pipeline._target_.startswith("nemo_automodel.")  # rewriting is instantiate's job


def test_env_interpolation_nested_default(base, monkeypatch):
    monkeypatch.delenv("NEMO_PP_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_config(base).checkpoint.dir == "/home/someone/.cache/nemo_pp/ckpt"
    monkeypatch.setenv("NEMO_PP_HOME", "/scratch/pp")
    assert load_config(base).checkpoint.dir == "/scratch/pp/ckpt"


def test_unset_env_without_default_fails_at_load(write_yaml, monkeypatch):
    monkeypatch.delenv("NEMO_PP_SURELY_UNSET", raising=False)
    path = write_yaml("paths:\n  data: ${oc.env:NEMO_PP_SURELY_UNSET}\n")
    with pytest.raises(ConfigError, match=r"paths\.data.*NEMO_PP_SURELY_UNSET"):
        load_config(path)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(missing)


def test_bad_yaml_names_file_and_line(write_yaml):
    path = write_yaml("a: 1\nb:\n  c: [1, 2\n  d: 3\n", name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "broken.yaml:" in msg and "line" in msg


def test_top_level_must_be_mapping(write_yaml):
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(write_yaml("- 1\n- 2\n"))


# --- defaults ---------------------------------------------------------------------------

DEFAULTS = {
    "step_scheduler": {"max_steps": 100, "ckpt_every_steps": 50},
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.999]},
    "distributed": {"strategy": "ddp", "cp_size": 1},
}


def test_defaults_fill_missing_sections_and_yaml_wins(base):
    cfg = load_config(base, defaults=DEFAULTS)
    assert cfg.step_scheduler.max_steps == 100  # section absent from the YAML
    assert cfg.distributed.strategy == "fsdp2"  # YAML wins
    assert cfg.distributed.cp_size == 1  # deep merge keeps default leaves
    # Same _target_: kwargs deep-merge, YAML values win.
    assert cfg.optimizer.lr == pytest.approx(1e-5)
    assert cfg.optimizer.weight_decay == pytest.approx(0.1)
    assert list(cfg.optimizer.betas) == [0.9, 0.95]


def test_defaults_node_with_other_target_is_replaced_whole(write_yaml):
    path = write_yaml("optimizer:\n  _target_: torch.optim.SGD\n  lr: 0.1\n")
    cfg = load_config(path, defaults=DEFAULTS)
    assert OmegaConf.to_container(cfg.optimizer) == {"_target_": "torch.optim.SGD", "lr": 0.1}


def test_defaults_yaml_node_without_target_merges(write_yaml):
    cfg = load_config(write_yaml("optimizer:\n  lr: 0.5\n"), defaults=DEFAULTS)
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.weight_decay == pytest.approx(0.1)


def test_defaults_nemo_prefix_counts_as_same_target(write_yaml):
    defaults = {"loss_fn": {"_target_": "nemo_pp.loss.masked_ce.MaskedCrossEntropy", "ignore_index": -100}}
    path = write_yaml("loss_fn:\n  _target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy\n")
    assert load_config(path, defaults=defaults).loss_fn.ignore_index == -100


def test_defaults_keep_yaml_order_first(base):
    keys = list(load_config(base, defaults=DEFAULTS).keys())
    assert keys == ["distributed", "model", "optimizer", "dataloader", "checkpoint", "step_scheduler"]


def test_defaults_may_be_referenced_by_interpolation(write_yaml):
    cfg = load_config(write_yaml("lr_copy: ${optimizer.lr}\n"), defaults=DEFAULTS)
    assert cfg.lr_copy == pytest.approx(3e-4)


def test_defaults_not_modified(write_yaml):
    defaults = {"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0}}
    load_config(write_yaml("optimizer:\n  _target_: torch.optim.SGD\n"), defaults=defaults)
    assert defaults == {"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0}}


def test_override_may_target_a_defaults_only_key(base):
    cfg = load_config(base, ["--step_scheduler.max_steps", "7"], defaults=DEFAULTS)
    assert cfg.step_scheduler.max_steps == 7


# --- overrides: forms and typing ----------------------------------------------------------


def test_override_three_forms(base):
    cfg = load_config(
        base,
        ["--distributed.pp_size", "2", "--distributed.tp_size=2", "dataloader.batch_size=16"],
    )
    assert (cfg.distributed.pp_size, cfg.distributed.tp_size, cfg.dataloader.batch_size) == (2, 2, 16)


def test_guide_pipelining_command_line(base):
    """The override block of the NeMo pipelining guide, verbatim."""
    argv = (
        "--distributed.strategy fsdp2 --distributed.pp_size 2 --distributed.pipeline.pp_schedule 1f1b "
        "--distributed.pipeline.pp_microbatch_size 1 "
        "--distributed.pipeline.round_virtual_stages_to_pp_multiple up "
        "--distributed.pipeline.scale_grads_in_schedule false"
    ).split()
    cfg = load_config(base, argv)
    pipe = cfg.distributed.pipeline
    assert cfg.distributed.pp_size == 2
    assert pipe.pp_microbatch_size == 1  # new kwarg under a _target_ node
    assert pipe.round_virtual_stages_to_pp_multiple == "up"
    assert pipe.scale_grads_in_schedule is False


@pytest.mark.parametrize(
    "text, expected",
    [
        ("false", False),
        ("true", True),
        ("null", None),
        ("1e-4", 1e-4),
        ("3e-5", 3e-5),
        ("1E5", 1e5),
        ("1.5", 1.5),
        (".5", 0.5),
        ("-2.5e-3", -2.5e-3),
        ("10", 10),
        ("-1", -1),
        ("[1,2]", [1, 2]),
        ("[1e-4, x]", [1e-4, "x"]),
        ("{a: 1, b: [2]}", {"a": 1, "b": [2]}),
        ("up", "up"),
        ('"1e-4"', "1e-4"),
        ("'false'", "false"),
        ("2024-01-01", "2024-01-01"),
        ("/data/squad.json", "/data/squad.json"),
    ],
)
def test_override_hydra_typing(base, text, expected):
    value = load_config(base, ["--dataloader.shuffle", text]).dataloader.shuffle
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes", "yes"),  # YAML 1.1: True
        ("off", "off"),  # YAML 1.1: False
        ("0x10", "0x10"),  # YAML 1.1: 16
        ("nan", math.nan),  # YAML: the string 'nan'
        ("-inf", -math.inf),
        ("2024-01-01T00:00:00", "2024-01-01T00:00:00"),  # YAML: a datetime
        ("'~/data'", "~/data"),  # unquoted `~/data` is not Hydra syntax, see below
        ("a b", "a b"),
        ("1_000", 1000),
    ],
)
def test_override_values_typed_by_hydra_not_yaml(base, text, expected):
    """Where Hydra's grammar and YAML disagree, an override follows Hydra."""
    value = load_config(base, ["--dataloader.shuffle", text]).dataloader.shuffle
    assert type(value) is type(expected)
    assert value == expected or (isinstance(expected, float) and math.isnan(expected) and math.isnan(value))


@pytest.mark.parametrize("text", ["~", "~/data"])
def test_override_value_tilde_needs_quotes(base, text):
    with pytest.raises(ConfigError, match=rf"(?s)cannot parse override '--dataloader\.shuffle {re.escape(text)}'.*quote"):
        load_config(base, ["--dataloader.shuffle", text])


def test_sweep_override_is_refused(base):
    with pytest.raises(ConfigError, match=r"'--optimizer\.betas 0\.9,0\.95'.*sweep.*\[a,b\]"):
        load_config(base, ["--optimizer.betas", "0.9,0.95"])
    assert list(load_config(base, ["--optimizer.betas", "[0.9,0.95]"]).optimizer.betas) == [0.9, 0.95]
    assert load_config(base, ["--model.name", "'a,b'"]).model.name == "a,b"


def test_parse_error_quotes_user_text_and_hydra_reason(base):
    with pytest.raises(ConfigError) as info:
        load_config(base, ["--dataloader.batch_size", "[1, 2"])
    msg = str(info.value)
    assert msg.startswith("cannot parse override '--dataloader.batch_size [1, 2': ")
    assert "no viable alternative" in msg and "'+a.b=value' (add)" in msg


def test_package_override_is_refused(base):
    with pytest.raises(ConfigError, match=r"cannot parse override 'model@x=1': expected a dotted key"):
        load_config(base, ["model@x=1"])


def test_float_override_has_float_type_in_every_form(base):
    for argv in (["--optimizer.lr", "3e-5"], ["--optimizer.lr=3e-5"], ["optimizer.lr=3e-5"]):
        lr = load_config(base, argv).optimizer.lr
        assert isinstance(lr, float) and lr == pytest.approx(3e-5)


def test_bare_flag_means_true(base):
    cfg = load_config(base, ["--dataloader.shuffle", "--distributed.pp_size", "2", "--model.bias"])
    assert cfg.dataloader.shuffle is True and cfg.model.bias is True and cfg.distributed.pp_size == 2


def test_override_value_may_start_with_single_dash(base):
    assert load_config(base, ["--dataloader.batch_size", "-1"]).dataloader.batch_size == -1


def test_override_list_element_and_interpolation(base):
    cfg = load_config(base, ["--dataloader.stages.1.name", "c", "+dataloader.twin=${dataloader.batch_size}"])
    assert cfg.dataloader.stages[1].name == "c"
    assert cfg.dataloader.twin == 8


def test_mapping_override_with_other_target_replaces_node(base):
    cfg = load_config(base, ["--optimizer", "{_target_: torch.optim.SGD, lr: 0.1}"])
    assert OmegaConf.to_container(cfg.optimizer) == {"_target_": "torch.optim.SGD", "lr": 0.1}


def test_mapping_override_same_target_merges(base):
    cfg = load_config(base, ["optimizer={lr: 0.5}"])
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 0.5
    assert list(cfg.optimizer.betas) == [0.9, 0.95]


# --- overrides: unknown keys, +, ~ ----------------------------------------------------------


def test_unknown_key_error_names_key_and_suggests(base):
    with pytest.raises(ConfigError) as info:
        load_config(base, ["--distributed.pp_sise", "2"])
    assert str(info.value) == (
        "unknown config key 'distributed.pp_sise' (from override '--distributed.pp_sise 2'); "
        "did you mean 'distributed.pp_size'? Use '+distributed.pp_sise=2' to add a new key."
    )
    assert isinstance(info.value, ValueError)


def test_unknown_key_in_hydra_form_quotes_user_text(base):
    with pytest.raises(ConfigError, match=r"from override 'dataloader\.batchsize=4'.*'dataloader\.batch_size'"):
        load_config(base, ["dataloader.batchsize=4"])


def test_unknown_key_deeper_under_target_node_is_rejected(base):
    with pytest.raises(ConfigError, match="unknown config key 'model.extra.depth'"):
        load_config(base, ["--model.extra.depth", "2"])


def test_unknown_section_is_rejected(base):
    with pytest.raises(ConfigError, match="unknown config key 'peft.dim'"):
        load_config(base, ["--peft.dim", "8"])


def test_new_kwarg_under_target_node_allowed(base):
    cfg = load_config(base, ["--model.bias", "false", "--optimizer.weight_decay=0.0"])
    assert cfg.model.bias is False and cfg.optimizer.weight_decay == 0.0


def test_plus_adds_new_key(base):
    cfg = load_config(base, ["+peft.dim=8", "+peft.targets=[q_proj, v_proj]"])
    assert cfg.peft.dim == 8 and list(cfg.peft.targets) == ["q_proj", "v_proj"]


def test_plus_on_existing_key_points_to_plain_form(base):
    with pytest.raises(ConfigError, match=r"already exists.*'distributed.pp_size=2'.*'\+\+distributed.pp_size=2'"):
        load_config(base, ["+distributed.pp_size=2"])
    assert load_config(base, ["++distributed.pp_size=2", "++new.key=1"]).new.key == 1


def test_tilde_deletes(base):
    cfg = load_config(base, ["~distributed.pipeline.layers_per_stage", "~checkpoint", "--~dataloader.shuffle"])
    assert "layers_per_stage" not in cfg.distributed.pipeline
    assert "checkpoint" not in cfg and "shuffle" not in cfg.dataloader


def test_tilde_with_value_checks_it(base):
    with pytest.raises(ConfigError, match="its value is 1, not 3"):
        load_config(base, ["~distributed.pp_size=3"])
    assert "pp_size" not in load_config(base, ["~distributed.pp_size=1"]).distributed


def test_tilde_unknown_key(base):
    with pytest.raises(ConfigError, match="unknown config key 'distributed.pp_sise'.*'distributed.pp_size'"):
        load_config(base, ["~distributed.pp_sise"])


def test_overrides_apply_in_order(base):
    cfg = load_config(base, ["+extra.a=1", "extra.a=2", "~extra.a", "+extra.a=3"])
    assert cfg.extra.a == 3


@pytest.mark.parametrize(
    "bad", [["junk"], ["--"], ["=3"], ["--=3"], ["a..b=1"], ["a.b=c=d"], ["--dataloader.batch_size", "[1, 2"], ["a=1,2"]]
)
def test_malformed_overrides(base, bad):
    with pytest.raises(ConfigError, match="cannot parse override"):
        load_config(base, bad)


def test_parse_cli_passes_other_tokens_to_hydra(base):
    path, overrides = parse_cli(["--config", str(base), "junk"])
    assert overrides == ["junk"]
    with pytest.raises(ConfigError, match="cannot parse override 'junk': missing EQUAL at '<EOF>'\nExpected"):
        load_config(path, overrides)


def test_get_dotted_keys(base):
    keys = get_dotted_keys(load_config(base))
    for k in ("distributed", "distributed.pipeline", "distributed.pipeline.pp_schedule", "dataloader.stages.0.name"):
        assert k in keys
    assert keys.index("distributed") < keys.index("distributed.pp_size")


# --- parse_cli -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "configs/x.yaml", "--a.b", "1"],
        ["--config=configs/x.yaml", "--a.b", "1"],
        ["-c", "configs/x.yaml", "--a.b", "1"],
        ["--a.b", "1", "--config", "configs/x.yaml"],
    ],
)
def test_parse_cli_config_forms(argv):
    path, overrides = parse_cli(argv)
    assert path == "configs/x.yaml"
    assert overrides == ["a.b=1"]


def test_parse_cli_groups_and_normalises():
    argv = [
        "--config", "c.yaml",
        "--distributed.pp_size", "2",
        "--optimizer.lr=1e-4",
        "dataloader.batch_size=4",
        "--model.flag",
        "+peft.dim=8",
        "--dataloader.shuffle",
        "~checkpoint",
        "--last",
    ]  # fmt: skip
    path, overrides = parse_cli(argv)
    assert path == "c.yaml"
    assert overrides == [
        "distributed.pp_size=2",
        "optimizer.lr=1e-4",
        "dataloader.batch_size=4",
        "model.flag=true",
        "+peft.dim=8",
        "dataloader.shuffle=true",
        "~checkpoint",
        "last=true",
    ]
    assert [o.source for o in overrides][:2] == ["--distributed.pp_size 2", "--optimizer.lr=1e-4"]
    assert all(isinstance(o, str) for o in overrides)


def test_parse_cli_output_feeds_load_config_with_original_text(base):
    path, overrides = parse_cli(["--config", str(base), "--distributed.pp_sise", "2"])
    with pytest.raises(ConfigError, match=r"from override '--distributed\.pp_sise 2'"):
        load_config(path, overrides)
    path, overrides = parse_cli(["--config", str(base), "--distributed.pp_size", "2"])
    assert load_config(path, overrides).distributed.pp_size == 2


@pytest.mark.parametrize("argv", [[], ["--a.b", "1"], ["--config"], ["--config="], ["-c", "--a.b"]])
def test_parse_cli_missing_config(argv):
    with pytest.raises(ConfigError) as info:
        parse_cli(argv)
    assert "torchrun --nproc_per_node=N recipes/finetune.py --config configs/X.yaml [--a.b value ...]" in str(
        info.value
    )


def test_parse_cli_config_twice():
    with pytest.raises(ConfigError, match="given twice"):
        parse_cli(["--config", "a.yaml", "-c", "b.yaml"])
