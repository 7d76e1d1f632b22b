"""The evaluation section's pieces in one process: SQuAD scoring, the prompts the data sets
offer, batched greedy generation against one prompt at a time, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from nemo_pp.training.evaluation import check_generation_dataset, evaluate_generation, score_answers


def test_scores_use_squads_normalisation_and_the_best_reference():
    # articles, case and punctuation are normalised away; F1 counts shared tokens (SQuAD v1.1's script)
    scores = score_answers(["The Eiffel Tower!", "in Paris France", "no"], [["eiffel tower"], ["Paris", "Lyon"], ["yes"]])
    assert scores["samples"] == 3
    assert scores["exact_match"] == pytest.approx(100 / 3)
    # F1: 1, 2 * (1/3 * 1) / (1/3 + 1) = 0.5, 0
    assert scores["f1"] == pytest.approx(100 * 1.5 / 3, abs=1e-4)
    assert score_answers([], []) == {"exact_match": 0.0, "f1": 0.0, "samples": 0}


@pytest.fixture(scope="module")
def squad_validation(tiny_assets):
    from transformers import AutoTokenizer

    from nemo_pp.datasets.llm.squad import SQuAD

    model, squad = tiny_assets
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return tokenizer, SQuAD(str(squad), "validation", tokenizer=tokenizer, seq_length=64, limit_dataset_samples=8)


def test_squad_prompts_are_the_training_prompts_with_every_reference(squad_validation):
    _, ds = squad_validation
    for i in range(4):
        example, item, row = ds.generation_example(i), ds[i], ds.rows[i]
        first_label = next(t for t, label in enumerate(item["labels"]) if label != -100)
        # labels are aligned (labels[t] = input_ids[t + 1]): the prompt ends at the first label's input
        trained = item["input_ids"][:first_label + 1]
        # training cut the prompt from the left to leave room for the answer; generation keeps a
        # whole sequence's worth of it (64 tokens here: SQuAD contexts are longer)
        assert len(example.prompt_ids) == 64 and example.prompt_ids[-len(trained):] == trained
        assert example.answers == row["answers"]["text"] and len(example.answers) >= 1


def test_column_mapped_prompts_and_answers(squad_validation, tmp_path):
    from nemo_pp.datasets.llm.column_mapped_text_instruction_dataset import ColumnMappedTextInstructionDataset

    tokenizer, _ = squad_validation
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"q": "Two plus two?", "a": "four"},
                                                       {"q": "Colours?", "a": ["red", "blue"]}]))
    ds = ColumnMappedTextInstructionDataset(str(path), {"question": "q", "answer": "a"}, tokenizer, seq_length=32)
    assert [ds.generation_example(i).answers for i in range(2)] == [["four"], ["red", "blue"]]
    assert ds.generation_example(0).prompt_ids == tokenizer("Two plus two?")["input_ids"]


def _greedy_one(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding by hand, without a cache or padding: the reference for generate."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt):]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(squad_validation, tiny_assets):
    from nemo_pp.training.evaluation import _generate, load_generation_model

    tokenizer, ds = squad_validation
    model = load_generation_model(tiny_assets[0], torch.device("cpu"), torch.float64)  # no near-ties in argmax
    from nemo_pp.datasets.llm.sft import GenerationExample

    # prompts of several lengths, so left padding and the attention mask matter
    examples = [GenerationExample(ds.generation_example(i).prompt_ids[-n:], ds.generation_example(i).answers)
                for i, n in enumerate((10, 23, 40, 64, 17, 31))]
    batched = _generate(model, examples, tokenizer, 6, 4, torch.device("cpu"))
    by_hand = [tokenizer.decode(_greedy_one(model, e.prompt_ids, 6, tokenizer.eos_token_id),
                                skip_special_tokens=True).strip() for e in examples]
    assert batched == by_hand
    alone = [ds.generation_example(i) for i in range(5)]
    result = evaluate_generation(model, tokenizer, alone, max_new_tokens=6, batch_size=4, device=torch.device("cpu"))
    assert result["samples"] == 5
    assert result["f1"] == score_answers(_generate(model, alone, tokenizer, 6, 1, torch.device("cpu")),
                                         [e.answers for e in alone])["f1"]


def test_prompts_without_a_reference_answer_are_refused_at_setup(squad_validation, tiny_assets, tmp_path):
    """SQuAD v2's unanswerable questions: refused when the evaluator is built (every rank
    alike), never found by one rank alone while the others wait in the all-reduce."""
    from omegaconf import OmegaConf

    from nemo_pp.datasets.llm.squad import SQuAD, load_squad_rows
    from nemo_pp.training.evaluation import GenerationEvaluator

    tokenizer, _ = squad_validation
    rows = load_squad_rows(str(tiny_assets[1]), "validation").select(range(4))
    path = tmp_path / "v2.jsonl"
    path.write_text("".join(json.dumps({**r, "answers": {"text": [], "answer_start": []} if i == 2 else r["answers"]})
                            + "\n" for i, r in enumerate(rows)))
    ds = SQuAD(str(path), "validation", tokenizer=tokenizer, seq_length=32)
    cfg = OmegaConf.create({"num_samples": None, "max_new_tokens": 4, "batch_size": 2})
    with pytest.raises(ValueError, match=r"validation_dataset rows \[2\] \(1 of 4\) have no reference answer"):
        GenerationEvaluator(cfg, ds, tokenizer, torch.device("cpu"), 0, 2)
    evaluator = GenerationEvaluator(OmegaConf.merge(cfg, {"num_samples": 2}), ds, tokenizer, torch.device("cpu"), 1, 2)
    assert [e.answers for e in evaluator.examples] == [ds.generation_example(1).answers]  # rank 1 of 2: prompt 1


def test_a_data_set_without_reference_answers_is_refused(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    from nemo_pp.datasets.llm.plain_text_dataset import PlainTextDataset

    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": "some words " * 20}) for _ in range(4)))
    ds = PlainTextDataset(str(path), tokenizer=AutoTokenizer.from_pretrained(str(tiny_assets[0])), seq_length=16)
    with pytest.raises(ValueError, match=r"evaluation: validation_dataset \(PlainTextDataset\) has no prompts with "
                                         r"reference answers"):
        check_generation_dataset(ds)


@pytest.mark.parametrize("change,message", [
    ({"validation_dataset": None}, "evaluation scores generations on the validation_dataset's prompts"),
    ({"checkpoint": {"save_consolidated": "false"}}, "checkpoint.save_consolidated=false exports none"),
])
def test_evaluation_without_prompts_or_export_is_refused(change, message):
    from nemo_pp.planning.checks import check_evaluation

    cfg = OmegaConf.create({"evaluation": {"metric": "squad"}, "validation_dataset": {"_target_": "x"},
                            "checkpoint": {"save_consolidated": "final"}})
    check_evaluation(cfg)  # the shipped shape passes
    with pytest.raises(ValueError, match=message):
        check_evaluation(OmegaConf.merge(cfg, change))
