"""Bad recipe input is refused before any process group or weight, naming key and fix."""

from __future__ import annotations

import pytest

from nemo_pp.config import ConfigError
from nemo_pp.planning.run_plan import plan_run
from nemo_pp.planning.schema import load_recipe_config
from tests.tiny_models import tiny_model

YAML = """
distributed:
  pp_size: 2
  pipeline:
    _target_: nemo_pp.distributed.pipelining.AutoPipeline
    pp_schedule: 1f1b
model:
  _target_: nemo_pp.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: {model}
dataset:
  _target_: nemo_pp.datasets.llm.squad.SQuAD
  path_or_dataset: {data}
dataloader:
  batch_size: 4
"""


@pytest.fixture
def cfg_file(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", layers=4).save_pretrained(model_dir)  # preflight reads the checkpoint's names only
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(model=model_dir, data=tmp_path / "data"))
    return path


def check(path, *overrides, world=2):
    cfg = load_recipe_config(path, list(overrides))
    return plan_run(cfg, world_size=world)


def test_good_config_derives_the_plan(cfg_file):
    plan = check(cfg_file, "step_scheduler.global_batch_size=8")
    assert (plan.sizes.pp, plan.sizes.dp, plan.local_batch_size, plan.grad_acc_steps) == (2, 1, 4, 2)
    pipe = plan.pipeline
    assert (pipe.schedule, pipe.num_stages, pipe.stage_ids, pipe.n_microbatches) == ("1F1B", 2, ((0,), (1,)), 4)
    assert pipe.module_fqns[1][-3:] == ("model.norm", "lm_head", "model.rotary_emb")


@pytest.mark.parametrize(
    "overrides,world,error,message",
    [
        ([], 3, ValueError, r"world size 3 is not divisible by pp_size\*cp_size\*tp_size"),
        (["distributed.pipeline.pp_microbatch_size=3"], 2, ValueError, "not divisible by distributed.pipeline.pp_microbatch_size"),
        (["dataloader.batch_size=1"], 2, ValueError, "1F1B needs at least as many microbatches as stages"),
        (["distributed.pipeline.pp_schedule=2f2b"], 2, ValueError, "Valid schedules: GPipe, 1F1B"),
        (["distributed.pp_size=8"], 8, ValueError, "only 4 layers"),
        (["step_scheduler.global_batch_size=6"], 2, ValueError, "step_scheduler.global_batch_size=6 is not a multiple"),
        (["model.pretrained_model_name_or_path=/nonexistent/model"], 2, FileNotFoundError, "python -m nemo_pp.assets"),
        (["dataset.path_or_dataset=/nonexistent/squad"], 2, FileNotFoundError, "dataset.path_or_dataset"),
        (["distributed.cp_size=2", "distributed.cp_attention=ring"], 4, ValueError,
         "cp_attention: ring .* has no CPU implementation; set distributed.cp_attention: allgather"),
        (["distributed.cp_size=2", "packed_sequence.packed_sequence_size=512"], 4, ValueError,
         "packed_sequence with distributed.cp_size > 1 is not supported"),
        # tiny llama: 4 heads, 2 kv heads, vocab 128
        (["distributed.tp_size=4"], 8, ValueError, r"tp_size=4 does not divide the model's num_key_value_heads=2"),
        (["distributed.tp_size=2", "distributed.sequence_parallel=true"], 4, ValueError,
         "set dataloader.pad_seq_len_divisible to a multiple of 2"),
        (["distributed.sequence_parallel=true"], 2, ValueError, "set distributed.tp_size > 1"),
        (["distributed.ep_size=2"], 4, ValueError, "ep_size=2: expert parallelism is proven for model types deepseek_v3, mixtral, "
         "olmoe, qwen2_moe, qwen3_moe, not 'llama'"),
        (["distributed.ep_size=4"], 4, ValueError,
         r"ep_size=4 does not divide the data-parallel x cp ranks of a stage.s replica, 2 x 1 = 2 .*use one of \[1, 2\]"),
        (["+model.gate_bias_update_factor=0.001"], 2, ValueError,
         r"model.gate_bias_update_factor=0.001: model type 'llama' has no router with a routing bias"),
        (["+model.gate_bias_update_factor=-1"], 2, ValueError, r"gate_bias_update_factor=-1.0 must be >= 0"),
        (["distributed.ep_size=2", "distributed.tp_size=2", "distributed.sequence_parallel=true"], 8, ValueError,
         "ep_size=2 with sequence_parallel: true"),
    ],
)
def test_bad_input_names_key_and_fix(cfg_file, overrides, world, error, message):
    with pytest.raises(error, match=message):
        check(cfg_file, *overrides, world=world)


def test_unimportable_target_and_unknown_override(cfg_file):
    with pytest.raises(ConfigError, match="loss_fn._target_"):
        check(cfg_file, "loss_fn._target_=nemo_pp.loss.masked_ce.MaskedCrossEntropyy")
    with pytest.raises(ConfigError, match="did you mean 'distributed.pp_size'"):
        check(cfg_file, "distributed.pp_sise=2")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset.seq_length=4096"], r"dataset.seq_length=4096 exceeds the model's max_position_embeddings=128"),
        (["distributed.pipeline.scale_grads_in_schedule=true"], "scale_grads_in_schedule: true is refused"),
        (["distributed.pipeline.patch_stage_backward_maybe_with_nosync=true"], "REDUCE_GRAD"),
        (["distributed.mp_policy={param_dtype: bfloat16}"], "distributed.mp_policy is FSDP2's mixed precision"),
        (["distributed.pipeline.pp_schedule=gpipe", "distributed.pipeline.layers_per_stage=1"],
         "gives 2 stages per rank, but the schedule runs one stage per rank"),
    ],
)
def test_refused_options_name_key_and_reason(cfg_file, overrides, message):
    with pytest.raises(ValueError, match=message):
        check(cfg_file, *overrides)


def test_pp1_plan_is_one_stage_and_max_steps_0_is_an_evaluate_only_run(cfg_file):
    plan = check(cfg_file, "distributed.pp_size=1", "step_scheduler.max_steps=0", world=1)
    assert plan.pipeline.num_stages == 1 and plan.pipeline.stage_ids == ((0,),)
    assert plan.total_steps(batches_per_epoch=0) == 0  # even an empty epoch: nothing to train
    assert "stage 0 (pp_rank 0)" in plan.describe()


def test_tp_plans_where_the_heads_divide(cfg_file):
    plan = check(cfg_file, "distributed.tp_size=2", world=4)
    assert (plan.sizes.pp, plan.sizes.tp, plan.sizes.dp) == (2, 2, 1)
    from nemo_pp.distributed.parallelize import build_parallelize_fn

    assert type(build_parallelize_fn(plan, None)).__name__ == "TensorParallelizer"  # nothing else to compose


def test_smollm2_tp_2_refused_naming_kv_heads_and_tp_3_planned(real_assets, tmp_path):
    """SmolLM2-135M has 9 heads and 3 kv heads: tp 3 splits them, tp 2 cannot."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "smollm2_135m_squad_pp2.yaml"
    overrides = [f"checkpoint.checkpoint_dir={tmp_path}"]
    with pytest.raises(ValueError, match=r"tp_size=2 does not divide the model's num_key_value_heads=3.*e.g. 3"):
        check(config, *overrides, "distributed.tp_size=2", world=4)
    plan = check(config, *overrides, "distributed.tp_size=3", world=6)
    assert (plan.sizes.pp, plan.sizes.tp) == (2, 3)


LORA = "+peft._target_=nemo_automodel.components._peft.lora.PeftConfig"


def test_peft_section_planned_with_nemo_target_and_stage_adapters(cfg_file):
    plan = check(cfg_file, LORA, "+peft.target_modules=[q_proj, '*.layers.3.mlp.down_proj']", "+peft.dim=4")
    assert plan.peft.target_modules == ["q_proj", "*.layers.3.mlp.down_proj"] and plan.peft.scale == 8.0
    assert not plan.lora_adapts_head and check(cfg_file, LORA, "+peft.match_all_linear=true").lora_adapts_head
    base = sum(p.numel() for p in tiny_model("llama", layers=4).parameters())
    assert plan.lora_params == (4 * 4 * (32 + 32) + 4 * (64 + 32), base)  # r (in + out) per adapted module
    from nemo_pp._peft.lora import apply_lora

    stage = tiny_model("llama", layers=4)
    assert apply_lora(stage, plan.peft) == 5  # 4 q_proj + one down_proj
    assert {n for n, p in stage.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in range(4) for ab in "AB"
    } | {f"model.layers.3.mlp.down_proj.lora_{ab}.default.weight" for ab in "AB"}


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["+peft.target_modules=[qkv_proj]"], 2, r"match no linear module of the model; its linear modules are named "
                                                 r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head'"),
        (["+peft.target_modules=[q_proj]", "+peft.exclude_modules=[lm_head]"], 2,
         "peft.target_modules and peft.exclude_modules exclude each other"),
        (["+peft.match_all_linear=true", "+peft.target_modules=[q_proj]"], 2, "peft.match_all_linear: true adapts"),
        (["+peft.dim=0"], 2, r"peft.dim must be an integer >= 1"),
        (["+peft.dropout=0.1", "+peft.dropout_position=post"], 2, "set dropout_position: pre"),
        (["+peft.use_dora=true"], 2, "peft.use_dora: true is not supported"),
        (["+peft.dimm=4"], 2, "unexpected keyword argument 'dimm'"),
        (["distributed.tp_size=2", "+peft.match_all_linear=true"], 4,
         r"peft with distributed.tp_size > 1 cannot adapt the output projection 'lm_head'"),
    ],
)
def test_bad_peft_section_names_the_key(cfg_file, overrides, world, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        check(cfg_file, LORA, *overrides, world=world)


def test_peft_target_must_build_a_peft_config(cfg_file):
    with pytest.raises(ValueError, match=r"peft._target_ must build a nemo_pp._peft.lora.PeftConfig"):
        check(cfg_file, "+peft._target_=torch.nn.Identity")


@pytest.mark.parametrize(
    "pattern,fqn,matches",
    [("*.layers.0.*.q_proj", "model.layers.0.self_attn.q_proj", True),
     ("*.layers.0.*.q_proj", "model.layers.10.self_attn.q_proj", False),
     ("*_proj", "model.layers.3.mlp.down_proj", True),
     ("*_proj", "lm_head", False),
     ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj", True)],
)
def test_lora_wildcards_follow_nemo(pattern, fqn, matches):
    from nemo_pp._peft.lora import wildcard_match

    assert wildcard_match(pattern, fqn) is matches


@pytest.mark.parametrize(
    "overrides,message",
    [(["packed_sequence.packed_sequence_size=64", "+dataset.seq_length=128"],
      r"packed_sequence.packed_sequence_size=64 is shorter than a sample may be \(dataset.seq_length=128\)"),
     (["packed_sequence.packed_sequence_size=256", "packed_sequence.split_across_pack=true"],
      "split_across_pack: true is not supported")],
)
def test_bad_packing_names_the_key(cfg_file, overrides, message):
    with pytest.raises(ValueError, match=message):
        check(cfg_file, *overrides)


def test_packing_plans_stages_at_the_row_length(cfg_file):
    from nemo_pp.planning.run_plan import planning_seq_len

    cfg = load_recipe_config(cfg_file, ["packed_sequence.packed_sequence_size=512", "+dataset.seq_length=128"])
    assert planning_seq_len(cfg) == 512
    check(cfg_file, "packed_sequence.packed_sequence_size=512", "+dataset.seq_length=128")


def test_context_parallel_plan(cfg_file):
    """cp 2 on the CPU: the all-gather attention, batches padded to whole chunks, FSDP2 over dp_shard x cp."""
    from nemo_pp.distributed.context_parallel import ContextParallel, ContextParallelizer
    from nemo_pp.distributed.parallelize import ComposedParallelizer, FSDP2Parallelizer, build_parallelize_fn

    plan = check(cfg_file, "distributed.cp_size=2", "dataloader.pad_seq_len_divisible=6", world=4)
    assert (plan.sizes.pp, plan.sizes.dp, plan.sizes.cp, plan.cp_attention) == (2, 1, 2, "allgather")
    assert plan.pad_seq_len_divisible == 12  # lcm(6, 2 * cp)
    assert "Context parallel: 2 ranks per sequence" in plan.describe()
    with pytest.raises(ValueError, match="needs the run's ContextParallel"):
        build_parallelize_fn(plan, None)  # the stages would attend within their own slice
    fn = build_parallelize_fn(plan, None, ContextParallel(None, plan.cp_attention))
    assert isinstance(fn, ComposedParallelizer)
    assert [type(s) for s in fn.steps[-2:]] == [ContextParallelizer, FSDP2Parallelizer]
    sp = check(cfg_file, "distributed.cp_size=2", "distributed.tp_size=2", "distributed.sequence_parallel=true", world=8)
    assert sp.pad_seq_len_divisible == 8  # each rank's slice splits again over tp
    assert check(cfg_file).pad_seq_len_divisible is None  # no cp: the config's value


def test_a_config_only_folder_plans_without_checking_weights(tmp_path):
    """``scripts/inspect_pipeline.py`` plans models that are not here (a config.json alone)."""
    model_dir = tmp_path / "model"
    tiny_model("llama", layers=4).config.save_pretrained(model_dir)
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(model=model_dir, data=tmp_path / "data"))
    cfg = load_recipe_config(path, [])
    plan = plan_run(cfg, world_size=2, check_checkpoint=False)
    assert plan.pipeline.num_stages == 2 and plan.weights is None
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors"):
        plan_run(cfg, world_size=2)  # the recipe's own plan reads the weights' names


def test_a_family_the_probe_finds_wrong_is_refused_by_the_plan(tmp_path):
    """Doge, outside the proven matrix: its parity probe fails and the plan refuses it,
    before any weight is read (a config.json alone)."""
    from transformers import AutoConfig

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    AutoConfig.for_model("doge", num_hidden_layers=4).save_pretrained(model_dir)
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(model=model_dir, data=tmp_path / "data"))
    with pytest.raises(ValueError, match=r"model type 'doge' \(DogeForCausalLM\) is not supported under the pipeline"):
        plan_run(load_recipe_config(path, []), world_size=2, check_checkpoint=False)


def test_router_loss_plans_on_an_moe_family_and_is_refused_where_inexact(tmp_path):
    """``model.output_router_logits=true`` plans on Mixtral; with cp > 1 it is refused naming
    both keys (a cp rank routes only its slice of the sequence); a dense family has no such config
    field, and the model's constructor refuses it (as transformers' from_pretrained would); every
    one before any weight is read."""
    from tests.helpers import family_model

    model_dir = tmp_path / "model"
    family_model("mixtral").config.save_pretrained(model_dir)
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(model=model_dir, data=tmp_path / "data"))
    on = "model.output_router_logits=true"
    plan = plan_run(load_recipe_config(path, [on]), world_size=2, check_checkpoint=False)
    assert plan.meta_model.config.output_router_logits is True
    with pytest.raises(ValueError, match=r"output_router_logits: true with distributed.cp_size=2 is not supported"):
        plan_run(load_recipe_config(path, [on, "distributed.cp_size=2"]), world_size=4, check_checkpoint=False)
    ep = plan_run(load_recipe_config(path, [on, "distributed.ep_size=2"]), world_size=4, check_checkpoint=False)
    assert (ep.sizes.ep, ep.sizes.ep_shard) == (2, 1)
    assert "Expert parallel: moe_mesh pp 2 x ep_shard 1 x ep 2; each rank holds 2 of 4 experts" in ep.describe()
    shard = plan_run(load_recipe_config(path, [on, "distributed.ep_size=2"]), world_size=8, check_checkpoint=False)
    assert (shard.sizes.ep, shard.sizes.ep_shard) == (2, 2)
    assert ("moe_mesh pp 2 x ep_shard 2 x ep 2; each rank holds 2 of 4 experts per MoE layer, tokens routed to them "
            "by all-to-all; FSDP2 shards them over the 2 ep_shard ranks that hold the same ones") in shard.describe()
    with pytest.raises(ValueError, match=r"ep_size=3 does not divide the model's 4 experts per layer; use one of \[2, 4\]"):
        plan_run(load_recipe_config(path, [on, "distributed.ep_size=3"]), world_size=6, check_checkpoint=False)
    dense = tmp_path / "dense"
    tiny_model("llama", layers=4).config.save_pretrained(dense)
    with pytest.raises(ValueError, match="'model'.*unexpected keyword argument 'output_router_logits'"):
        plan_run(load_recipe_config(path, [on, f"model.pretrained_model_name_or_path={dense}"]), world_size=2,
                 check_checkpoint=False)


def test_lora_on_experts_is_refused_with_the_reason_and_attention_lora_plans(tmp_path):
    """A mixture of experts' experts are fused 3-D parameters and its router no nn.Linear:
    naming them in peft.target_modules is refused; the attention projections plan."""
    from tests.helpers import family_model

    model_dir = tmp_path / "model"
    family_model("mixtral").config.save_pretrained(model_dir)
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(model=model_dir, data=tmp_path / "data"))
    peft = ["+peft._target_=nemo_automodel.components._peft.lora.PeftConfig", "+peft.dim=4"]
    plan = plan_run(load_recipe_config(path, [*peft, "+peft.target_modules=['*_proj']"]), world_size=2,
                    check_checkpoint=False)
    assert plan.lora_params[0] > 0
    for target in ("experts", "*.mlp.gate"):
        with pytest.raises(ValueError, match=r"names 'model.layers.0.mlp.(experts|gate)', a Mixtral\w+, not an nn.Linear"):
            plan_run(load_recipe_config(path, [*peft, f"+peft.target_modules=['{target}']"]), world_size=2,
                     check_checkpoint=False)


def test_the_shipped_moe_config_plans_on_the_real_upcycled_model(real_moe_model, tmp_path):
    """configs/smollm2_moe_squad_pp2.yaml on 4 processes: pp 2 x dp 2 x ep 2, the load-balancing loss
    on, and the split the expert-aware cost model balances (17/13: twice the MLP FLOPs per
    layer against the same head), every tensor name of the per-expert checkpoint covered."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "smollm2_moe_squad_pp2.yaml"
    plan = check(config, f"checkpoint.checkpoint_dir={tmp_path}", world=4)
    assert (plan.sizes.pp, plan.sizes.dp, plan.sizes.ep) == (2, 2, 2)
    assert plan.meta_model.config.output_router_logits and plan.meta_model.config.router_aux_loss_coef == 0.01
    layers = [sum(".layers." in n for n in names) for names in plan.pipeline.module_fqns]
    assert layers == [17, 13]
    assert plan.weights.sources.keys_of("model.layers.0.mlp.experts.down_proj") == [
        f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]


FUSED = "loss_fn._target_=nemo_pp.loss.FusedLinearCrossEntropy"


@pytest.mark.parametrize("overrides,message", [
    ([LORA, "+peft.match_all_linear=true", "+peft.dropout=0.1"], r"loss_fn \(FusedLinearCrossEntropy\) with LoRA on "
                                                                 r"the output projection needs peft.dropout: 0"),
    (["distributed.pipeline.patch_causal_lm_model=false"], "set distributed.pipeline.patch_causal_lm_model: true"),
])
def test_fused_loss_refusals_name_loss_fn(cfg_file, overrides, message):
    with pytest.raises(ValueError, match=message):
        check(cfg_file, FUSED, *overrides)


def test_fused_loss_plans_with_lora_on_the_head_without_dropout(cfg_file):
    assert check(cfg_file, FUSED, LORA, "+peft.match_all_linear=true", "+peft.dropout=0.0").lora_adapts_head


def test_compile_plans_and_is_refused_where_inductor_cannot_build(cfg_file, monkeypatch):
    assert check(cfg_file, "compile.enabled=true").compile_kwargs == {
        "backend": "inductor", "mode": None, "fullgraph": False, "dynamic": None}
    assert check(cfg_file).compile_kwargs is None
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no C++ compiler to be found
    with pytest.raises(ValueError, match=r"compile.enabled: true with backend inductor needs a C\+\+ compiler"):
        check(cfg_file, "compile.enabled=true")


def test_the_fused_loss_rebalances_only_an_automatic_split(cfg_file):
    from nemo_pp.planning.cost import PieceCosts, layers_per_stage
    from nemo_pp.planning.run_plan import replan_for_fused_loss

    def layers(plan):
        return layers_per_stage(plan.pipeline)

    plan = check(cfg_file, "distributed.pp_size=2")
    assert plan.head_computes_loss is False and check(cfg_file, FUSED).head_computes_loss is True
    assert replan_for_fused_loss(plan, 1.0) is not None
    heavy_last = PieceCosts(embedding=0.0, layers=(1.0,) * 4, head=6.0)  # a head of 6 layers...
    profiled = check(cfg_file, "distributed.pp_size=2", "distributed.pipeline.split=profile")
    assert layers(replan_for_fused_loss(profiled, 1.0, heavy_last)) == [3, 1]
    assert layers(replan_for_fused_loss(profiled, 0.01, heavy_last)) == [2, 2]  # ...computed on 1 % of the tokens
    assert replan_for_fused_loss(check(cfg_file, "distributed.pp_size=2", "distributed.pipeline.split=uniform"),
                                 0.01) is None
    assert replan_for_fused_loss(check(cfg_file, "distributed.pp_size=1"), 0.01) is None
