"""The evaluation section in the real recipe on 2 forked ranks (a 2-stage pipeline): the
exact match and F1 it reports, each rank answering half the prompts, equal those of one
process scoring the same folders (the pretrained model, then the run's export: a LoRA
run's adapter folder on the base model)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import launch_recipe, recipe_overrides

EVALUATION = "--evaluation={max_new_tokens: 8, num_samples: 6, batch_size: 1}"


def _single_process_scores(folder, tokenizer, dataset, adapter=None) -> tuple[dict, list[str]]:
    from nemo_pp.training.evaluation import _generate, load_generation_model, score_answers

    model = load_generation_model(folder, torch.device("cpu"), torch.float32, adapter)
    examples = [dataset.generation_example(i) for i in range(6)]
    predictions = _generate(model, examples, tokenizer, 8, 1, torch.device("cpu"))
    return score_answers(predictions, [e.answers for e in examples]), predictions


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_recipe_scores_equal_one_process_scoring_the_same_folders(tiny_assets, tmp_path, lora):
    from transformers import AutoTokenizer

    from nemo_pp.datasets.llm.squad import SQuAD, load_squad_rows

    model, squad = tiny_assets
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = load_squad_rows(str(squad), "validation").select(range(6))
    _, pretrained_answers = _single_process_scores(
        model, tokenizer, SQuAD(str(squad), "validation", tokenizer=tokenizer, seq_length=32, limit_dataset_samples=6))
    # half the questions get the pretrained model's own answer (where it gave one) as the
    # reference: a score that is not 0
    path = tmp_path / "validation.jsonl"
    with path.open("w") as f:
        for i, row in enumerate(rows):
            if i % 2 == 0 and pretrained_answers[i].strip():
                row["answers"] = {"text": [pretrained_answers[i]], "answer_start": [0]}
            f.write(json.dumps(row) + "\n")
    validation = SQuAD(str(path), "validation", tokenizer=tokenizer, seq_length=32)
    expected_before, _ = _single_process_scores(model, tokenizer, validation)
    assert expected_before["exact_match"] > 0

    out = tmp_path / "run"
    launch_recipe(2, recipe_overrides(model, squad, out, f"--validation_dataset.path_or_dataset={path}",
                                      "--validation_dataset.limit_dataset_samples=6",
                                      "--dataset.limit_dataset_samples=32", "--step_scheduler.max_steps=2",
                                      "--dataloader.batch_size=4", "--step_scheduler.global_batch_size=4",
                                      EVALUATION, *(["+peft={target_modules: ['*_proj'], dim: 4, alpha: 64}",
                                                     "--optimizer.lr=3e-2"] if lora else [])))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["tag"]: r for r in records if r["event"] == "evaluation"}
    assert set(scored) == {"pretrained", "after training"} and scored["pretrained"]["step"] == 0
    after = (model, out / "hf_adapter") if lora else (out / "hf_model", None)
    expected_after, _ = _single_process_scores(after[0], tokenizer, validation, after[1])
    for tag, expected in (("pretrained", expected_before), ("after training", expected_after)):
        assert scored[tag]["samples"] == 6
        assert abs(scored[tag]["exact_match"] - expected["exact_match"]) < 1e-9, (tag, scored[tag], expected)
        assert abs(scored[tag]["f1"] - expected["f1"]) < 1e-9, (tag, scored[tag], expected)
    summary = records[-1]
    assert summary["exact_match_before"] == scored["pretrained"]["exact_match"]
    assert summary["f1_after"] == scored["after training"]["f1"]
