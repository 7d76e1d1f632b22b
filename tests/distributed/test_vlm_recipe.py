"""The vision-language recipe end to end on forked gloo ranks: the digits image task on a
tiny LLaVA (SmolLM2's tokenizer and processor, a fresh CLIP tower) through the real recipe.

At pp 2 the validation losses, every training loss and the exported weights equal the
unsplit run's (pp 1); a run stopped by SIGTERM after step 3 and started again resumes
exactly; the consolidated export reloads as ``LlavaForConditionalGeneration`` with its tie.
Bad input is refused on every rank before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, launch_recipe

CONFIG = str(ROOT / "configs" / "smollm2_135m_llava_digits_pp2.yaml")


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, f"--model.pretrained_model_name_or_path={model}",
            f"--dataset.path_or_dataset={data}", f"--validation_dataset.path_or_dataset={data}",
            "--dataset.limit_dataset_samples=24", "--validation_dataset.limit_dataset_samples=8",
            "--dataloader.batch_size=4", "--step_scheduler.global_batch_size=4", "--step_scheduler.max_steps=6",
            "--distributed.pipeline.pp_microbatch_size=1", "--optimizer.lr=1e-3", "--lr_scheduler.lr_warmup_steps=1",
            "--step_scheduler.ckpt_every_steps=3", f"--checkpoint.checkpoint_dir={out}", *extra]


def _plan(argv: list[str]):
    from nemo_pp.config import parse_cli
    from nemo_pp.planning.run_plan import plan_run
    from nemo_pp.planning.schema import load_recipe_config

    return plan_run(load_recipe_config(*parse_cli(argv)), world_size=2)


def _records(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_vlm_recipe_pp2_equals_unsplit_and_resumes_exactly(tiny_vlm_assets, tmp_path):
    model, data = tiny_vlm_assets
    unsplit, straight, resumed = tmp_path / "pp1", tmp_path / "pp2", tmp_path / "resumed"
    launch_recipe(1, _argv(model, data, unsplit, "--distributed.pp_size=1"))
    launch_recipe(2, _argv(model, data, straight))
    launch_recipe(2, _argv(model, data, resumed), sigterm_after_step=3)
    assert max(r["step"] for r in _records(resumed, "train")) == 3
    launch_recipe(2, _argv(model, data, resumed))

    ref = {r["step"]: r["loss"] for r in _records(unsplit, "train")}
    for out in (straight, resumed):
        got = {r["step"]: r["loss"] for r in _records(out, "train")}
        assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
        for step in ref:
            assert abs(got[step] - ref[step]) < 1e-5, (out.name, step, got[step], ref[step])
    val = {r["tag"]: r["val_loss"] for r in _records(unsplit, "validation")}
    for tag, loss in {r["tag"]: r["val_loss"] for r in _records(straight, "validation")}.items():
        assert abs(loss - val[tag]) < 1e-5, (tag, loss, val[tag])  # validation under the pipeline
    assert val["after training"] < val["before training"]

    a, b, c = (_weights(o / "hf_model") for o in (unsplit, straight, resumed))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5, msg=name)
        torch.testing.assert_close(c[name], b[name], rtol=0, atol=1e-6, msg=name)
    vision = "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    key = vision if vision in a else next(k for k in a if "vision_tower" in k and "fc1" in k)
    assert not torch.equal(a[key], _weights(model)[key]), "the vision tower trained"

    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    hf = AutoModelForImageTextToText.from_pretrained(straight / "hf_model")
    assert isinstance(hf, LlavaForConditionalGeneration)
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    AutoProcessor.from_pretrained(straight / "hf_model")  # the processor is exported beside the weights


@pytest.mark.parametrize("change, message", [
    (("--dataset._target_=nemo_pp.datasets.llm.squad.make_squad_dataset",), "is a text-only data set"),
    (("--distributed.tp_size=2", "--distributed.pp_size=1"), "distributed.tp_size=2 is not supported"),
    (("+distributed.pipeline.module_fqns_per_model_part=[[model.language_model.embed_tokens,"
      "model.language_model.layers.0,model.language_model.layers.1,model.language_model.layers.2,"
      "model.language_model.layers.3,model.language_model.rotary_emb],[model.vision_tower,"
      "model.multi_modal_projector,model.language_model.layers.4,model.language_model.layers.5,"
      "model.language_model.layers.6,model.language_model.layers.7,model.language_model.norm,lm_head,"
      "model.language_model.rotary_emb]]",), "a multimodal encoder"),
])
def test_vlm_bad_input_is_refused_before_weights(tiny_vlm_assets, tmp_path, change, message):
    """Refused by the plan on every rank (the plan reads no weight and no row)."""
    model, data = tiny_vlm_assets
    with pytest.raises(ValueError, match=message):
        _plan(_argv(model, data, tmp_path / "out", *change))


def test_text_model_with_image_data_is_refused(tiny_assets, digits_data, tmp_path):
    with pytest.raises(ValueError, match="is an image data set but the model"):
        _plan(_argv(tiny_assets[0], digits_data, tmp_path / "out",
                    "--model._target_=nemo_pp.NeMoAutoModelForCausalLM.from_pretrained"))
