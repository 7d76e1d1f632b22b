"""A task metric by generation: greedy answers to the validation prompts, scored with SQuAD's
exact match and F1 (the ``evaluation:`` section).

The model generating is a Hugging Face model read from a folder: before training the
pretrained model (``model.pretrained_model_name_or_path``), after training the run's
export (``hf_model/``, or the base model with the ``hf_adapter/`` of a LoRA run). It is
not the pipelined stages: ``transformers``' ``generate`` (KV cache, stop at eos) is the
library's, and what is scored is exactly what a user loads afterwards. Prompts are formatted
as training formats them, cut from the left to the data set's ``seq_length``. Each rank loads
the whole model and answers every ``world_size``-th prompt, so this suits models that fit
one device; the scores are summed over ranks.

Scoring is ``torchmetrics.functional.text.squad``: the official SQuAD v1.1 evaluation script's
normalisation (lower case, no punctuation, no articles ``a an the``, single spaces) and
its token F1, each prediction taking its best reference (Rajpurkar et al., 2016).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_pp.datasets.llm.sft import GenerationExample

__all__ = ["EvaluationError", "GenerationEvaluator", "GenerationExample", "check_generation_dataset",
           "evaluate_generation", "load_generation_model", "score_answers"]


def check_generation_dataset(dataset, key: str = "validation_dataset") -> int:
    """The number of prompts ``dataset`` offers for evaluation by generation.

    A data set takes part when it has ``generation_example(i) -> GenerationExample``
    (``SQuAD`` and ``ColumnMappedTextInstructionDataset`` do).

    Raises:
        ValueError: the data set has no reference answers to score against (names ``key``).
    """
    if not callable(getattr(dataset, "generation_example", None)):
        raise ValueError(
            f"evaluation: {key} ({type(dataset).__name__}) has no prompts with reference answers to score "
            "generations against; use nemo_pp.datasets.llm.squad.SQuAD or ColumnMappedTextInstructionDataset "
            "there, or remove the evaluation section"
        )
    return len(dataset)


def load_generation_model(folder: str | Path, device: torch.device, dtype: torch.dtype | None = None,
                          adapter: str | Path | None = None):
    """A Hugging Face causal LM from ``folder`` on ``device`` in eval mode; with
    ``adapter`` a PEFT adapter folder applied on top of it (``peft.PeftModel``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(device).eval()


@torch.no_grad()
def _generate(model, examples: list[GenerationExample], tokenizer, max_new_tokens: int, batch_size: int,
              device: torch.device) -> list[str]:
    """Greedy answers to ``examples``, batched with left padding (each prompt ends where
    its answer starts); the text after the prompt up to eos, special tokens removed."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            mask[row, width - len(e.prompt_ids):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]
    return answers


def score_answers(predictions: list[str], references: list[list[str]], device: torch.device | None = None,
                  sync: bool = False) -> dict[str, float]:
    """SQuAD exact match and F1 of ``predictions`` against ``references`` (one list of
    answers per prediction), by ``torchmetrics.functional.text.squad``.

    Args:
        device: where the counts are summed (the process group's device).
        sync: sum over the default process group (collective: every rank calls it with its
            own share, which may be empty).

    Returns:
        ``{"exact_match": %, "f1": %, "samples": n}``, over every rank's predictions when ``sync``.
    """
    from torchmetrics.functional.text import squad

    sums = torch.zeros(3, dtype=torch.float64, device=device or torch.device("cpu"))  # EM %, F1 %, count
    if predictions:
        scores = squad([{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)],
                       [{"answers": {"text": list(r), "answer_start": [0] * len(r)}, "id": str(i)}
                        for i, r in enumerate(references)])
        n = len(predictions)
        sums += torch.tensor([float(scores["exact_match"]) * n, float(scores["f1"]) * n, n], dtype=torch.float64,
                             device=sums.device)
    if sync:
        dist.all_reduce(sums)
    em, f1, n = sums.tolist()
    return {"exact_match": em / max(n, 1), "f1": f1 / max(n, 1), "samples": int(n)}


def evaluate_generation(model, tokenizer, examples: list[GenerationExample], *, max_new_tokens: int,
                        batch_size: int, device: torch.device, sync: bool = False) -> dict:
    """Exact match and F1 (percent) of ``model``'s greedy answers to ``examples`` (this
    rank's share), summed over the default process group when ``sync`` (collective).

    Returns:
        ``{"exact_match", "f1", "samples", "seconds", "examples"}``: percentages over all
        ranks' answers, the wall time (seconds) and this rank's first three
        ``(prediction, references)`` pairs.
    """
    start = time.perf_counter()
    predictions = _generate(model, examples, tokenizer, max_new_tokens, batch_size, device)
    references = [e.answers for e in examples]
    scores = score_answers(predictions, references, device, sync=sync)
    return {**scores, "seconds": time.perf_counter() - start,
            "examples": list(zip(predictions[:3], references[:3]))}


class EvaluationError(RuntimeError):
    """Scoring failed on some rank (the same message is raised on every rank)."""


class GenerationEvaluator:
    """The ``evaluation:`` section for one run: scores a model folder on the validation prompts.

    The prompts are built and checked here, at setup, on every rank alike (the same data),
    so a bad one stops every rank with the same error before any weight is read.

    Args:
        cfg: the ``evaluation`` config node (:class:`nemo_pp.planning.schema.EvaluationConfig`).
        dataset: the validation data set (has ``generation_example``).
        tokenizer: the run's tokenizer.
        device: this rank's device; rank / world_size: the default process group's.

    Raises:
        ValueError: the data set has no reference answers (:func:`check_generation_dataset`),
            or a prompt has none (SQuAD v2's unanswerable questions), naming ``validation_dataset``.
    """

    def __init__(self, cfg, dataset, tokenizer, device: torch.device, rank: int, world_size: int):
        n = check_generation_dataset(dataset)
        n = n if cfg.num_samples is None else min(cfg.num_samples, n)
        examples = [dataset.generation_example(i) for i in range(n)]
        empty = [i for i, e in enumerate(examples) if not any(str(a).strip() for a in e.answers)]
        if empty:
            raise ValueError(
                f"evaluation: validation_dataset rows {empty[:5]} ({len(empty)} of {n}) have no reference answer to "
                "score against (SQuAD v2's unanswerable questions, an empty answer column); drop those rows from the "
                "validation file, or remove the evaluation section")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.examples = examples[rank::world_size]  # this rank answers every world_size-th prompt
        self.device, self.rank, self.world_size = device, rank, world_size

    def score(self, folder: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | None = None) -> dict:
        """:func:`evaluate_generation` of the model in ``folder`` (with a PEFT ``adapter``
        folder on top) in ``dtype`` (None: the folder's); the model is freed afterwards. Collective.

        Raises:
            EvaluationError: loading or generating failed on some rank (out of memory, an
                unreadable folder): raised on every rank, so none waits in the all-reduce.
        """
        from nemo_pp.errors import first_error_of_all_ranks

        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the training step's cached blocks: room for the whole model
        predictions, error, start = [], None, time.perf_counter()
        try:
            model = load_generation_model(folder, self.device, dtype, adapter)
            predictions = _generate(model, self.examples, self.tokenizer, self.cfg.max_new_tokens,
                                    self.cfg.batch_size, self.device)
            del model
        except Exception as exc:  # every failure must reach the other ranks, not only ours
            error = f"evaluation of {folder} failed on rank {self.rank}: {type(exc).__name__}: {exc}"
        if (error := first_error_of_all_ranks(error)) is not None:
            raise EvaluationError(error)
        references = [e.answers for e in self.examples]
        scores = score_answers(predictions, references, self.device, sync=self.world_size > 1)
        return {**scores, "seconds": time.perf_counter() - start,
                "examples": list(zip(predictions[:3], references[:3]))}
