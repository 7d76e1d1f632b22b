"""nemo_pp.planning.schema: the recipe's typed config, its defaults and its checks."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from nemo_pp.config import ConfigError, instantiate, parse_cli, save_config, validate_targets
from nemo_pp.planning.schema import FinetuneConfig, PipelineConfig, load_recipe_config, schema_defaults

REAL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smollm2_135m_squad_pp2.yaml"

MINIMAL = """
model:
  _target_: torch.nn.Linear
  in_features: 4
  out_features: 2
dataset:
  _target_: nemo_pp.datasets.llm.squad.SQuAD
  path_or_dataset: /data/squad
"""


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str = MINIMAL, name: str = "cfg.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def minimal(write_yaml):
    return write_yaml()


def _error(path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe_config(path, list(overrides))
    return str(info.value)


# --- the real config ------------------------------------------------------------------------


def test_real_config_loads_typed(monkeypatch):
    monkeypatch.setenv("NEMO_PP_HOME", "/scratch/pp")
    cfg = load_recipe_config(REAL_CONFIG)
    checks = {
        "seed": (int, 42),
        "distributed.pp_size": (int, 2),
        "distributed.sequence_parallel": (bool, False),
        "distributed.pipeline.pp_microbatch_size": (int, 1),
        "distributed.pipeline.scale_grads_in_schedule": (bool, False),
        "distributed.pipeline.round_virtual_stages_to_pp_multiple": (str, "up"),
        "dataloader.batch_size": (int, 8),
        "dataloader.shuffle": (bool, True),
        "dataloader.pad_seq_len_divisible": (int, 16),
        "step_scheduler.global_batch_size": (int, 8),
        "step_scheduler.max_steps": (int, 20),
        "optimizer.lr": (float, 5.0e-5),
        "lr_scheduler.lr_warmup_steps": (int, 3),
        "lr_scheduler.min_lr": (float, 5.0e-6),
        "clip_grad_norm.max_norm": (float, 1.0),
        "dist_env.timeout_minutes": (float, 10.0),  # a default (10 in the old defaults) typed float
        "logging.log_every_steps": (int, 1),
        "checkpoint.save_consolidated": (str, "final"),  # YAML `true` is stored as "final"
    }
    for key, (typ, value) in checks.items():
        got = OmegaConf.select(cfg, key)
        assert type(got) is typ and got == value, key
    assert cfg.model.pretrained_model_name_or_path == "/scratch/pp/models/SmolLM2-135M-Instruct"  # resolved
    assert cfg.distributed.pipeline.dtype is None and cfg.distributed.pipeline.defer_fsdp_grad_sync is True
    assert OmegaConf.get_type(cfg.distributed.pipeline) is PipelineConfig
    assert OmegaConf.get_type(cfg) is FinetuneConfig
    with pytest.raises(ValidationError):  # stays typed after loading
        cfg.step_scheduler.max_steps = "abc"


def test_parse_cli_then_load_then_save_keeps_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_PP_HOME", "/scratch/pp")
    argv = ["--config", str(REAL_CONFIG), "--step_scheduler.max_steps", "7", "--optimizer.lr=3e-4", "dist_env.device=cpu"]
    path, overrides = parse_cli(argv)
    cfg = load_recipe_config(path, overrides)
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(out.read_text())
    assert saved["step_scheduler"]["max_steps"] == 7 and saved["optimizer"]["lr"] == 3e-4
    assert saved["dist_env"]["device"] == "cpu"
    assert saved["model"]["pretrained_model_name_or_path"] == "/scratch/pp/models/SmolLM2-135M-Instruct"
    monkeypatch.delenv("NEMO_PP_HOME")
    again = load_recipe_config(out)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_defaults_are_the_recipe_defaults():
    """The schema's defaults: the old RECIPE_DEFAULTS plus AutoPipeline's three new kwargs."""
    old_pipeline = {
        "_target_": "nemo_pp.distributed.pipelining.AutoPipeline", "pp_schedule": "1f1b", "pp_schedule_csv": None,
        "pp_microbatch_size": 1, "layers_per_stage": None, "round_virtual_stages_to_pp_multiple": None,
        "module_fqns_per_model_part": None, "patch_inner_model": True, "patch_causal_lm_model": True,
        "scale_grads_in_schedule": False, "pp_seq_len": None,
    }  # fmt: skip
    new_pipeline = {"patch_stage_backward_maybe_with_nosync": False, "defer_fsdp_grad_sync": True, "pool_recv_buffers": True, "dtype": None,
                    "split": "balanced", "max_stage_params": None}
    assert schema_defaults(FinetuneConfig) == {
        "seed": 42,
        "dist_env": {"device": "auto", "timeout_minutes": 10.0},
        "distributed": {
            "strategy": "fsdp2", "dp_size": None, "dp_replicate_size": 1, "tp_size": 1, "cp_size": 1, "cp_attention": "auto", "ep_size": 1, "pp_size": 1,
            "sequence_parallel": False, "activation_checkpointing": False, "mp_policy": None,
            "pipeline": {**old_pipeline, **new_pipeline},
        },
        "model": None,
        "loss_fn": {"_target_": "nemo_pp.loss.masked_ce.MaskedCrossEntropy"},
        "dataset": None,
        "validation_dataset": None,
        "dataloader": {"batch_size": 1, "shuffle": True, "num_workers": 0, "pad_seq_len_divisible": None},
        "step_scheduler": {
            "global_batch_size": None, "local_batch_size": None, "num_epochs": 1, "max_steps": None,
            "val_every_steps": None, "ckpt_every_steps": None, "max_consecutive_skipped_steps": 3,
        },
        "optimizer": {
            "_target_": "torch.optim.AdamW", "lr": 1.0e-5, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0,
        },
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "cosine", "min_lr": 0.0},
        "clip_grad_norm": {"max_norm": 1.0},
        "logging": {"log_every_steps": 1, "expert_load_every_steps": 10, "peak_tflops": None},
        "compile": {"enabled": False, "backend": "inductor", "mode": None, "fullgraph": False, "dynamic": None},
        "checkpoint": {
            "enabled": False, "checkpoint_dir": "outputs/finetune", "model_save_format": "torch_save",
            "save_consolidated": "final", "is_async": False, "restore_from": None, "max_recent_checkpoints": None,
            "save_merged_model": False, "verify_checksums": True, "check_free_space": True,
        },
        "peft": None,
        "packed_sequence": {"packed_sequence_size": 0, "split_across_pack": False},
        "tensorboard": None,
        "wandb": None,
        "evaluation": None,
    }  # fmt: skip


def test_minimal_yaml_gets_every_default(minimal):
    cfg = load_recipe_config(minimal)
    assert cfg.distributed.pipeline.pp_schedule == "1f1b" and cfg.step_scheduler.max_steps is None
    assert cfg.loss_fn._target_ == "nemo_pp.loss.masked_ce.MaskedCrossEntropy"
    assert cfg.validation_dataset is None and cfg.optimizer.lr == 1e-5


def test_typed_sections_instantiate_and_validate(minimal, monkeypatch):
    monkeypatch.setenv("NEMO_PP_TARGET_ALLOWLIST", "builtins.dict")
    cfg = load_recipe_config(minimal, ["distributed.pipeline._target_=builtins.dict", "distributed.pipeline.dtype=torch.bfloat16"])
    validate_targets(cfg)
    kwargs = instantiate(cfg.distributed.pipeline, pp_batch_size=4)
    expected = dict(schema_defaults(FinetuneConfig)["distributed"]["pipeline"], dtype="bfloat16", pp_batch_size=4)
    del expected["_target_"]
    assert kwargs == expected
    optimizer = instantiate(cfg.optimizer, params=torch.nn.Linear(2, 2).parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-5


# --- defaults under the YAML: `_target_` nodes ------------------------------------------------


def test_yaml_optimizer_of_other_class_gets_no_adamw_kwargs(write_yaml):
    path = write_yaml(MINIMAL + "optimizer: {_target_: torch.optim.SGD, lr: 0.1}\n")
    assert OmegaConf.to_container(load_recipe_config(path).optimizer) == {"_target_": "torch.optim.SGD", "lr": 0.1}


def test_override_optimizer_of_other_class_replaces_node(minimal):
    cfg = load_recipe_config(minimal, ["optimizer={_target_: torch.optim.SGD, lr: 0.1}"])
    assert OmegaConf.to_container(cfg.optimizer) == {"_target_": "torch.optim.SGD", "lr": 0.1}


def test_yaml_optimizer_without_target_merges_with_default(write_yaml):
    cfg = load_recipe_config(write_yaml(MINIMAL + "optimizer: {lr: 0.5}\n"))
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 0.5
    assert list(cfg.optimizer.betas) == [0.9, 0.999]


def test_free_form_sections_keep_any_kwargs(minimal):
    cfg = load_recipe_config(
        minimal, ["model.bias=false", "optimizer.amsgrad=true", "+dataset.limit_dataset_samples=8", "loss_fn.ignore_index=-1"]
    )
    assert cfg.model.bias is False and cfg.optimizer.amsgrad is True
    assert cfg.dataset.limit_dataset_samples == 8 and cfg.loss_fn.ignore_index == -1


# --- accepted values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("step_scheduler.max_steps=0", "step_scheduler.max_steps", 0),  # evaluate-only run
        ("clip_grad_norm.max_norm=null", "clip_grad_norm.max_norm", None),  # no clipping
        ("distributed.pipeline.round_virtual_stages_to_pp_multiple=down", "distributed.pipeline.round_virtual_stages_to_pp_multiple", "down"),
        ("distributed.pipeline.round_virtual_stages_to_pp_multiple=null", "distributed.pipeline.round_virtual_stages_to_pp_multiple", None),
        ("distributed.pipeline.dtype=bfloat16", "distributed.pipeline.dtype", "bfloat16"),
        ("distributed.pipeline.dtype=torch.bfloat16", "distributed.pipeline.dtype", "bfloat16"),
        ("distributed.pipeline.dtype=torch.float16", "distributed.pipeline.dtype", "float16"),
        ("distributed.pipeline.pp_schedule=null", "distributed.pipeline.pp_schedule", None),
        ("distributed.pipeline.module_fqns_per_model_part=[[model.embed_tokens, model.layers.0], [lm_head]]",
         "distributed.pipeline.module_fqns_per_model_part", [["model.embed_tokens", "model.layers.0"], ["lm_head"]]),
        ("lr_scheduler.lr_decay_style=constant", "lr_scheduler.lr_decay_style", "constant"),
        ("dist_env.device=cuda", "dist_env.device", "cuda"),
        ("optimizer.lr=0", "optimizer.lr", 0),
        ("dist_env.timeout_minutes=1", "dist_env.timeout_minutes", 1.0),
    ],
)  # fmt: skip
def test_accepted_values(minimal, override, key, expected):
    value = OmegaConf.select(load_recipe_config(minimal, [override]), key)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert value == expected and type(value) is type(expected)


def test_number_given_as_text_by_env_interpolation_is_typed(write_yaml, monkeypatch):
    monkeypatch.setenv("NEMO_PP_TEST_STEPS", "12")
    cfg = load_recipe_config(write_yaml(MINIMAL + "step_scheduler: {max_steps: '${oc.env:NEMO_PP_TEST_STEPS}'}\n"))
    assert cfg.step_scheduler.max_steps == 12 and type(cfg.step_scheduler.max_steps) is int


# --- rejected values: the message names the key, the value and a fix ------------------------------

REJECTED = [
    ("distributed.pp_size=0", "distributed.pp_size", "0"),
    ("distributed.tp_size=0", "distributed.tp_size", "0"),
    ("distributed.cp_size=-1", "distributed.cp_size", "-1"),
    ("distributed.dp_size=0", "distributed.dp_size", "0"),
    ("distributed.dp_replicate_size=0", "distributed.dp_replicate_size", "0"),
    ("dataloader.batch_size=0", "dataloader.batch_size", "0"),
    ("distributed.pipeline.pp_microbatch_size=0", "distributed.pipeline.pp_microbatch_size", "0"),
    ("distributed.pipeline.layers_per_stage=0", "distributed.pipeline.layers_per_stage", "0"),
    ("step_scheduler.num_epochs=0", "step_scheduler.num_epochs", "0"),
    ("step_scheduler.global_batch_size=0", "step_scheduler.global_batch_size", "0"),
    ("step_scheduler.local_batch_size=-2", "step_scheduler.local_batch_size", "-2"),
    ("step_scheduler.max_steps=abc", "step_scheduler.max_steps", "'abc'"),
    ("step_scheduler.max_steps=2.5", "step_scheduler.max_steps", "2.5"),
    ("step_scheduler.max_steps=-1", "step_scheduler.max_steps", "-1"),
    ("optimizer.lr=-1e-4", "optimizer.lr", "-0.0001"),
    ("optimizer.lr=fast", "optimizer.lr", "'fast'"),
    ("distributed.strategy=ddp", "distributed.strategy", "'ddp'"),
    ("dist_env.device=gpu", "dist_env.device", "'gpu'"),
    ("lr_scheduler.lr_decay_style=step", "lr_scheduler.lr_decay_style", "'step'"),
    ("distributed.pipeline.round_virtual_stages_to_pp_multiple=sideways",
     "distributed.pipeline.round_virtual_stages_to_pp_multiple", "'sideways'"),
    ("distributed.pipeline.dtype=fp8", "distributed.pipeline.dtype", "'fp8'"),
    ("distributed.pipeline.dtype=torch.int8", "distributed.pipeline.dtype", "'torch.int8'"),
    ("clip_grad_norm.max_norm=0", "clip_grad_norm.max_norm", "0"),
    ("clip_grad_norm.max_norm=-1.0", "clip_grad_norm.max_norm", "-1.0"),
    ("dist_env.timeout_minutes=0", "dist_env.timeout_minutes", "0"),
    ("dist_env.timeout_minutes=-5", "dist_env.timeout_minutes", "-5"),
    ("logging.log_every_steps=0", "logging.log_every_steps", "0"),
    ("dataloader.shuffle=maybe", "dataloader.shuffle", "'maybe'"),
    ("distributed.pipeline.module_fqns_per_model_part=[a, b]", "distributed.pipeline.module_fqns_per_model_part", "['a', 'b']"),
    ("seed=abc", "seed", "'abc'"),
    ("dataloader=4", "dataloader", "4"),
]  # fmt: skip


@pytest.mark.parametrize("override, key, value", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_values_name_key_value_and_fix(minimal, override, key, value):
    msg = _error(minimal, override)
    assert msg.startswith(f"invalid config value {key}={value}"), msg
    assert f"e.g. --{key}=" in msg  # the fix


def test_range_message_says_what_is_valid(minimal):
    msg = _error(minimal, "step_scheduler.max_steps=-1")
    assert "must be >= 0, or null (0 evaluates only" in msg and "--step_scheduler.max_steps=0" in msg
    assert "one of 'auto', 'cpu', 'cuda'" in _error(minimal, "dist_env.device=gpu")


def test_rejected_value_in_the_yaml_too(write_yaml):
    msg = _error(write_yaml(MINIMAL + "distributed: {pp_size: 0}\n"))
    assert msg.startswith("invalid config value distributed.pp_size=0: must be >= 1")


# --- unknown sections and keys ----------------------------------------------------------------


def test_unknown_top_level_section_from_override_is_refused(minimal):
    msg = _error(minimal, "+pefft={dim: 8}")
    assert msg.startswith("unknown top-level section 'pefft': nemo_pp does not read it; did you mean 'peft'? "
                          "(known sections: seed, ")
    assert "optimizer" in msg


def test_peft_section_without_a_target_is_lora(minimal):
    cfg = load_recipe_config(minimal, ["+peft={dim: 4}"])
    assert cfg.peft == {"_target_": "nemo_pp._peft.lora.PeftConfig", "dim": 4}
    assert _error(minimal, "+peft=8").startswith("invalid config value peft=8: must be a mapping with a _target_")


def test_unknown_top_level_section_in_yaml_is_refused_with_suggestion(write_yaml):
    msg = _error(write_yaml(MINIMAL + "optimiser: {lr: 0.1}\n"))
    assert "unknown top-level section 'optimiser'" in msg and "did you mean 'optimizer'?" in msg


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("+dataloader.batch_sise=4", "dataloader.batch_sise", "dataloader.batch_size"),
        ("+step_scheduler.max_step=4", "step_scheduler.max_step", "step_scheduler.max_steps"),
        ("+distributed.pp_sizes=2", "distributed.pp_sizes", "distributed.pp_size"),
        ("distributed.pipeline.pp_microbatch=2", "distributed.pipeline.pp_microbatch", "distributed.pipeline.pp_microbatch_size"),
        ("+lr_scheduler.lr_warmup=2", "lr_scheduler.lr_warmup", "lr_scheduler.lr_warmup_steps"),
        ("+clip_grad_norm.max_norms=2", "clip_grad_norm.max_norms", "clip_grad_norm.max_norm"),
        ("+logging.log_every=2", "logging.log_every", "logging.log_every_steps"),
        ("+checkpoint.checkpoint_dirs=x", "checkpoint.checkpoint_dirs", "checkpoint.checkpoint_dir"),
        ("+dist_env.timeout=2", "dist_env.timeout", "dist_env.timeout_minutes"),
    ],
)  # fmt: skip
def test_unknown_key_in_typed_section_is_refused(minimal, override, key, suggestion):
    msg = _error(minimal, override)
    assert msg.startswith(f"unknown key '{key}': nemo_pp does not read it; did you mean '{suggestion}'?"), msg


def test_pipeline_kwarg_the_pipeline_does_not_take_is_refused(minimal):
    # A `_target_` node takes new kwargs without `+`; the typed pipeline section still refuses unknown ones.
    assert "unknown key 'distributed.pipeline.pp_batch_size'" in _error(minimal, "--distributed.pipeline.pp_batch_size", "4")


# --- `_target_` sections ---------------------------------------------------------------------


@pytest.mark.parametrize("section", ["model", "dataset"])
def test_required_sections(write_yaml, section):
    data = yaml.safe_load(MINIMAL)
    del data[section]
    assert _error(write_yaml(yaml.safe_dump(data))).startswith(f"missing config section '{section}': nemo_pp needs it")


@pytest.mark.parametrize("section", ["model", "dataset", "optimizer", "loss_fn"])
def test_target_sections_need_a_target(minimal, section):
    msg = _error(minimal, f"~{section}._target_")
    assert msg.startswith(f"invalid config value {section}=") and "a mapping with a _target_" in msg


def test_validation_dataset_optional_but_needs_target(minimal):
    assert load_recipe_config(minimal, ["+validation_dataset=null"]).validation_dataset is None
    assert "invalid config value validation_dataset=" in _error(minimal, "+validation_dataset={split: validation}")


def test_nan_lr_is_refused(minimal):
    # Hydra types `nan` as a float; a NaN learning rate would pass a plain `< 0` test.
    msg = _error(minimal, "optimizer.lr=nan")
    assert msg.startswith("invalid config value optimizer.lr=nan")
    assert math.isinf(load_recipe_config(minimal, ["dist_env.timeout_minutes=inf"]).dist_env.timeout_minutes)


def test_every_schema_field_says_what_it_means():
    """Each section's docstring documents each of its keys (an ``Attributes:`` entry)."""
    import dataclasses
    import re

    from nemo_pp.planning import schema

    for cls in [schema.FinetuneConfig, *(v for v in vars(schema).values()
                                        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__name__.endswith("Config"))]:
        doc = cls.__doc__ or ""
        described = set(re.findall(r"^\s{8}([\w /]+):", doc, flags=re.M))
        names = {n.strip() for entry in described for n in entry.split("/")}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in names]
        assert not missing, f"{cls.__name__} does not document {missing}"
