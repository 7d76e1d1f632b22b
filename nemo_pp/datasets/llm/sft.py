"""Token-level supervised examples shared by the instruction and chat data sets.

Shift convention (every nemo_pp data set): labels are ALIGNED for next-token
prediction, ``labels[t] == input_ids[t + 1]`` or -100; from ``tokens`` and per-token
``targets`` (a token or -100), ``input_ids = tokens[:-1]`` and ``labels = targets[1:]``.
The loss does not shift again.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_pp.loss import IGNORE_INDEX


@dataclass
class GenerationExample:
    """One prompt to answer by generation and its reference answers (``evaluation:``).

    Attributes:
        prompt_ids: the prompt's tokens exactly as training formats them (chat template and
            generation prompt included), ``list[int]``.
        answers: every reference answer (SQuAD has up to 5 per question).
    """

    prompt_ids: list[int]
    answers: list[str]


def truncate_prompt_answer(prompt: list[int], answer: list[int], seq_length: int) -> tuple[list[int], list[int]]:
    """Fit ``prompt + answer`` into ``seq_length + 1`` tokens (the inputs are one shorter).

    Policy: the prompt is cut from the LEFT (the tokens next to the answer stay), so the
    answer survives whole when it fits; an answer longer than ``seq_length`` is cut on the
    right (its eos is lost) and one prompt token is kept so every kept answer token is a label.
    """
    budget = seq_length + 1
    if len(prompt) + len(answer) <= budget:
        return prompt, answer
    answer = answer[:seq_length]
    keep = budget - len(answer)  # >= 1
    return prompt[-keep:], answer


def prompt_answer_example(prompt: list[int], answer: list[int], seq_length: int | None,
                          answer_only_loss: bool = True) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of ``prompt + answer`` (the answer ending in eos),
    truncated by :func:`truncate_prompt_answer`; with ``answer_only_loss`` the prompt's
    labels are -100."""
    if seq_length is not None:
        prompt, answer = truncate_prompt_answer(prompt, answer, seq_length)
    tokens = prompt + answer
    targets = ([IGNORE_INDEX] * len(prompt) + answer) if answer_only_loss else tokens
    return {"input_ids": tokens[:-1], "labels": targets[1:]}


def check_tokenizer(tokenizer, owner: str) -> None:
    """Raise when ``tokenizer`` is missing or has no eos token (every answer ends with one)."""
    if tokenizer is None:
        raise TypeError(f"{owner} needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer has no eos token; {owner} ends every answer with one")


def check_seq_length(seq_length: int | None, key: str) -> None:
    """Check a data set's ``seq_length`` (tokens per example's inputs; None: no truncation).

    Args:
        seq_length: the value to check.
        key: the config section named in the error, e.g. ``"dataset"``.

    Raises:
        ValueError: ``seq_length`` is neither None nor an integer >= 1.
    """
    if seq_length is not None and (not isinstance(seq_length, int) or seq_length < 1):
        raise ValueError(f"{key}.seq_length must be an integer >= 1 or null, not {seq_length!r}")
