"""Vision-language pieces in one process: family detection, the batch-major image layout
and its inverse, the vision tower in the cost model and the memory plan, encoder placement
in the FQN tables, and the image + conversation data set on the real digits and processor."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import vlm_batch
from tests.tiny_models import tiny_vlm, tiny_vlm_config


def test_vision_family_refuses_an_unproven_vision_language_model_by_name():
    import transformers

    from nemo_pp.models.vlm import vision_family

    assert vision_family(transformers.LlamaConfig()) is None
    assert vision_family(tiny_vlm_config("llava")).name == "LLaVA"
    with pytest.raises(ValueError, match="'llava_next' is a vision-language model"):
        vision_family(transformers.LlavaNextConfig())


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "idefics3"])
def test_unbatch_images_gives_each_microbatch_its_samples_images(model_type):
    """Per microbatch of the batch-major layout, exactly the images of its samples, in order."""
    from nemo_pp.models.vlm import FAMILIES, unbatch_images

    family = FAMILIES[model_type]
    counts = [1, 0, 2, 1]
    batch, hf = vlm_batch(model_type, counts, 48, seed=3)
    assert batch["pixel_values"].shape[0] == 4 and batch["num_images"].tolist() == counts
    meta = {k: batch[k] for k in family.image_meta}
    whole = unbatch_images(family, batch["num_images"], batch["pixel_values"], **meta)
    torch.testing.assert_close(whole["pixel_values"], hf["pixel_values"], rtol=0, atol=0)
    # microbatches of 2 samples: their images concatenated are the batch's
    halves = [unbatch_images(family, batch["num_images"][i:i + 2], batch["pixel_values"][i:i + 2],
                             **{k: v[i:i + 2] for k, v in meta.items()}) for i in (0, 2)]
    axis = 1 if model_type == "idefics3" else 0
    torch.testing.assert_close(torch.cat([h["pixel_values"] for h in halves], axis), hf["pixel_values"], rtol=0, atol=0)
    assert unbatch_images(family, batch["num_images"][1:2], batch["pixel_values"][1:2],
                          **{k: v[1:2] for k, v in meta.items()}) == {}  # a sample without images


def test_qwen2_vl_positions_are_the_models_own():
    from nemo_pp.models.vlm import multimodal_position_ids

    model = tiny_vlm("qwen2_vl")
    batch, hf = vlm_batch("qwen2_vl", [1, 0, 2, 1], 48, seed=0)
    positions = multimodal_position_ids(model, batch)
    expected, _ = model.model.get_rope_index(hf["input_ids"], mm_token_type_ids=hf["mm_token_type_ids"],
                                             image_grid_thw=hf["image_grid_thw"])
    assert positions.shape == (3, 4, 48)
    torch.testing.assert_close(positions, expected, rtol=0, atol=0)
    assert not torch.equal(positions[0], positions[1])  # image tokens carry 2-D positions


def test_vision_tower_counts_in_the_split_and_the_memory_plan():
    from nemo_pp.planning.cost import flop_costs
    from nemo_pp.planning.memory import memory_plan
    from nemo_pp.planning.pipeline import make_pipeline_plan
    from tests.tiny_models import tiny_config

    assert flop_costs(tiny_config(), 2, 64).embedding == 0
    llava = tiny_vlm("llava").to("meta")
    assert flop_costs(llava.config, 2, 64).embedding > 0
    plan = make_pipeline_plan(llava, pp_size=2, pp_schedule="1f1b", pp_microbatch_size=1, pp_batch_size=4,
                              split="uniform")
    with_vision = memory_plan(llava, plan, seq_len=48)
    from nemo_pp.planning import memory

    original = memory.vision_activation_bytes
    memory.vision_activation_bytes = lambda *a: 0
    try:
        without = memory_plan(llava, plan, seq_len=48)
    finally:
        memory.vision_activation_bytes = original
    assert with_vision[0].activation_bytes > without[0].activation_bytes
    assert with_vision[1].activation_bytes == without[1].activation_bytes
    for model_type in ("qwen2_vl", "gemma3", "idefics3"):  # the plan runs for every family
        model = tiny_vlm(model_type).to("meta")
        memory_plan(model, make_pipeline_plan(model, pp_size=2, pp_schedule="1f1b", pp_microbatch_size=1,
                                              pp_batch_size=4, split="uniform"), seq_len=48)


def test_fqn_generator_and_validation_keep_encoders_on_stage_0():
    from nemo_pp.distributed.pipelining import hf_utils
    from nemo_pp.planning.split import generate_hf_model_fqn_per_model_part, validate_stage_modules

    assert "vision_tower" in hf_utils.MULTIMODAL_SUFFIXES and "connector" in hf_utils.MULTIMODAL_SUFFIXES
    model = tiny_vlm("llava")
    table = generate_hf_model_fqn_per_model_part(2, 4, fqn_prefix="model.language_model.")
    assert "model.vision_tower" in table[0] and "model.multi_modal_projector" in table[0]
    cleaned = validate_stage_modules(model, table)
    assert "model.vision_tower" in cleaned[0]
    none = generate_hf_model_fqn_per_model_part(2, 4, fqn_prefix="model.language_model.",
                                                include_multimodal_encoders=False)
    assert not any("vision" in n for names in none for n in names)
    moved = [[n for n in table[0] if "vision" not in n and "projector" not in n],
             table[1] + ["model.vision_tower", "model.multi_modal_projector"]]
    with pytest.raises(ValueError, match=r"module_fqns_per_model_part\[1\] holds 'model.vision_tower'"):
        validate_stage_modules(model, moved)


def test_hidden_and_vocab_size_at_different_levels():
    """The reference's helper finds sizes on the config or its text_config."""
    from nemo_pp.distributed.pipelining.functional import _get_hidden_and_vocab_size

    assert _get_hidden_and_vocab_size(tiny_vlm_config("llava")) == (32, 160)
    cfg = tiny_vlm_config("qwen2_vl")
    assert _get_hidden_and_vocab_size(cfg) == (32, 160)


# ------------------------------------------------------------------ the data set, on the real assets


@pytest.fixture(scope="module")
def llava_processor(digits_data):
    from transformers import AutoProcessor

    from nemo_pp.assets import is_complete, smollm2_llava_dir

    if not is_complete(smollm2_llava_dir()):
        pytest.skip("run python -m nemo_pp.assets --only vlm")
    return AutoProcessor.from_pretrained(smollm2_llava_dir())


def test_vlm_dataset_labels_the_assistant_turn_only(llava_processor, digits_data):
    from nemo_pp.datasets.vlm import VLMCollator, make_vlm_dataset

    ds = make_vlm_dataset(str(digits_data), processor=llava_processor, split="validation", limit_dataset_samples=4)
    item = ds[0]
    image_token = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert item["input_ids"].count(image_token) == 16 and item["pixel_values"].shape == (1, 3, 16, 16)
    answer = json.loads((digits_data / "validation.jsonl").read_text().splitlines()[0])["answer"]
    labelled = [t for t in item["labels"] if t != -100]
    assert llava_processor.tokenizer.decode(labelled).startswith(answer + "<|im_end|>")
    assert all(l == -100 for i, l in zip(item["input_ids"][1:], item["labels"]) if i == image_token)
    batch = VLMCollator("llava", 2, 16)([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 3, 16, 16) and batch["input_ids"].shape[1] % 16 == 0


def test_vlm_dataset_refuses_images_the_template_does_not_render(llava_processor, digits_data, tmp_path):
    from nemo_pp.datasets.vlm import make_vlm_dataset

    rows = (digits_data / "validation.jsonl").read_text().splitlines()[:2]
    (tmp_path / "images").symlink_to(digits_data / "images")
    (tmp_path / "validation.jsonl").write_text("\n".join(rows) + "\n")
    text_only = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="holds 0 image token"):
        make_vlm_dataset(str(tmp_path), processor=llava_processor, split="validation", chat_template=text_only)
    missing = json.loads(rows[0])
    missing["messages"][0]["content"][0]["image"] = "images/nope.png"
    (tmp_path / "validation.jsonl").write_text(json.dumps(missing) + "\n")
    with pytest.raises(ValueError, match="is not a file"):
        make_vlm_dataset(str(tmp_path), processor=llava_processor, split="validation")
