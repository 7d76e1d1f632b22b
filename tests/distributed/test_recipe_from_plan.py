"""The recipe builds from its plan: the meta model is built once per rank, and the
builder re-validates nothing the plan holds (real recipe setup on 2 gloo ranks, pp 2)."""

from __future__ import annotations

import shutil

import pytest

from tests.distributed.launcher import run_ranks
from tests.tiny_models import tiny_model

YAML = """
distributed:
  pp_size: 2
  pipeline:
    pp_schedule: 1f1b
model:
  _target_: nemo_pp.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: {model}
dataset:
  _target_: nemo_pp.datasets.llm.squad.SQuAD
  path_or_dataset: {data}
  split: train
  seq_length: 64
  limit_dataset_samples: 8
dataloader:
  batch_size: 2
step_scheduler:
  max_steps: 1
checkpoint:
  enabled: false
  save_consolidated: false
  checkpoint_dir: {out}
"""


def _setup_and_count(rank, world, path):
    import nemo_pp.distributed.pipelining.autopipeline as autopipeline
    import nemo_pp.distributed.pipelining.build as build
    import nemo_pp.models.loading as loading
    import nemo_pp.planning.run_plan as run_plan
    from nemo_pp.planning.schema import load_recipe_config
    from nemo_pp.recipes.finetune import FinetuneRecipe

    builds = []
    real_empty_model = loading.empty_model

    def counted(*args, **kwargs):
        builds.append(1)
        return real_empty_model(*args, **kwargs)

    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"the builder ran {name}, which the plan already did")
        return fail

    loading.empty_model = run_plan.empty_model = counted  # every meta build goes through it
    for module in (autopipeline, build):
        for name in ("validate_stage_modules", "validate_hf_model_for_pipeline_support", "make_pipeline_plan"):
            if hasattr(module, name):
                setattr(module, name, refuse(name))
    recipe = FinetuneRecipe(load_recipe_config(path)).setup()
    summary = recipe.run()
    return {"meta_builds": len(builds), "stages": [s.stage_index for s in recipe.ap.info.stages],
            "loss": summary["final_train_loss"]}


@pytest.mark.distributed
def test_recipe_builds_the_meta_model_once_and_the_builder_trusts_the_plan(real_assets, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", layers=4, vocab=49152).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (real_assets[0] / name).exists():
            shutil.copy(real_assets[0] / name, model_dir / name)
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(model=model_dir, data=real_assets[1], out=tmp_path / "out"))
    results = run_ranks(_setup_and_count, 2, str(path), timeout=240)
    assert [r["meta_builds"] for r in results] == [1, 1]
    assert [r["stages"] for r in results] == [[0], [1]]
    assert results[1]["loss"] is not None and results[1]["loss"] > 0
