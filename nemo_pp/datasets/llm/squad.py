"""SQuAD as a supervised fine-tuning data set (question answering -> answer tokens).

YAML (NeMo AutoModel shape)::

    dataset:
      _target_: nemo_pp.datasets.llm.squad.SQuAD
      path_or_dataset: ${oc.env:NEMO_PP_HOME,~/.cache/nemo_pp}/data/squad   # or rajpurkar/squad
      split: train
      seq_length: 512
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_pp.assets import looks_like_local_path, missing_asset_message, squad_dir
from nemo_pp.datasets.llm.loading import load_split
from nemo_pp.datasets.llm.sft import IGNORE_INDEX, GenerationExample, prompt_answer_example  # noqa: F401  (IGNORE_INDEX: re-exported)
from nemo_pp.datasets.streaming import NoRandomAccess, Streamable, StreamSource

_KEY = "dataset.path_or_dataset"


def load_squad_rows(path_or_dataset: str, split: str, streaming: bool = False):
    """Load one split as a ``datasets.Dataset`` of ``rajpurkar/squad`` rows (a
    ``datasets.IterableDataset`` with ``streaming``: nothing read yet).

    Args:
        path_or_dataset: a hub id (``"rajpurkar/squad"``), a local folder holding
            ``train.jsonl`` / ``validation.jsonl`` (as ``python -m nemo_pp.assets``
            writes), or one ``.json`` / ``.jsonl`` file (then loaded as ``split``).
        split: split name, e.g. ``"train"`` or ``"validation"``.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: a local split with no rows or a file ``datasets`` cannot parse;
            streaming: a sliced split or a source ``datasets`` cannot stream.
    """
    import datasets

    if looks_like_local_path(path_or_dataset):
        path = Path(path_or_dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(missing_asset_message(path_or_dataset, "dataset path_or_dataset"))
        if path.is_file():
            return load_split(lambda s: datasets.load_dataset("json", data_files={s: str(path)}, split=s,
                                                              streaming=streaming), split, _KEY, path, streaming)
        return load_split(lambda s: datasets.load_dataset(str(path), split=s, streaming=streaming), split, _KEY, path,
                          streaming)
    try:
        if streaming:
            return load_split(lambda s: datasets.load_dataset(path_or_dataset, split=s, streaming=True), split, _KEY,
                              path_or_dataset, streaming)
        return datasets.load_dataset(path_or_dataset, split=split)
    except OSError as e:  # ConnectionError, hub's not-found errors
        msg = (
            f"could not load dataset {path_or_dataset!r} from the hub ({e}). Offline, prepare "
            f"the local copy with `python -m nemo_pp.assets` and set path_or_dataset to "
            f"{squad_dir()}"
        )
        try:
            err = type(e)(msg)  # keep the class so callers' except clauses still match
        except TypeError:
            err = OSError(msg)
        raise err from e


class SQuAD(Streamable, torch.utils.data.Dataset):
    """SQuAD question answering, tokenized for SFT with the loss on the answer only.

    Each item is ``{"input_ids": list[int], "labels": list[int]}`` of equal length.
    The sequence is ``prompt + answer + eos`` where the prompt is

    * with a chat template: ``apply_chat_template([{"role": "user", "content":
      "Context: {context}\\nQuestion: {question}"}], add_generation_prompt=True)``;
    * without: ``"Context: {context} Question: {question} Answer:"`` (answer after a space).

    Shift convention: labels are already ALIGNED for next-token prediction,
    ``labels[t] == input_ids[t + 1]`` (or -100): from ``tokens = prompt + answer + [eos]``,
    ``input_ids = tokens[:-1]`` and ``labels = masked(tokens)[1:]``. The loss must NOT
    shift again. With ``answer_only_loss`` the prompt tokens are masked with -100, so
    the labels are exactly the answer tokens and the eos.

    Truncation (``seq_length``): the prompt is cut from the LEFT (its last tokens, next
    to the answer, are kept), so the answer always survives; if the answer alone does
    not fit, it is cut on the right (the eos is then lost) and one prompt token is kept
    so that every kept answer token is still a label.

    Args:
        path_or_dataset: hub id, local folder with ``train.jsonl``/``validation.jsonl``,
            or a single ``.json``/``.jsonl`` file; see :func:`load_squad_rows`.
        split: which split to load.
        tokenizer: a Hugging Face tokenizer with an eos token. Required.
        seq_length: maximum ``len(input_ids)``; None means no truncation.
        limit_dataset_samples: use only the first N rows (file order).
        use_chat_template: None = use it when the tokenizer has one; True = require it;
            False = plain text prompt.
        answer_only_loss: mask the prompt in the labels (else train on every token).
        seed: kept for NeMo YAML compatibility; rows are not shuffled here (the sampler
            shuffles).
        streaming: read and tokenize rows as training consumes them
            (:mod:`nemo_pp.datasets.streaming`): :attr:`stream` is set, ``len`` and indexing
            raise ``TypeError``, iterating yields one pass of samples.

    Raises:
        TypeError: ``tokenizer`` is None.
        ValueError: ``use_chat_template=True`` without a chat template, no eos token,
            or ``seq_length < 1``; streaming: a sliced split, an empty stream, a source
            ``datasets`` cannot stream.
        FileNotFoundError: a local path that does not exist.
    """

    def __init__(
        self,
        path_or_dataset: str = "rajpurkar/squad",
        split: str = "train",
        tokenizer=None,
        seq_length: int | None = None,
        limit_dataset_samples: int | None = None,
        use_chat_template: bool | None = None,
        answer_only_loss: bool = True,
        seed: int = 42,
        streaming: bool = False,
    ):
        if tokenizer is None:
            raise TypeError("SQuAD needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; SQuAD ends every answer with one")
        if seq_length is not None and seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")

        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.answer_only_loss = answer_only_loss
        self.seed = seed

        rows = load_squad_rows(str(path_or_dataset), split, streaming)
        if streaming:  # nothing tokenized now: the recipe's stream maps rows as it reads them
            self.rows = rows.take(int(limit_dataset_samples)) if limit_dataset_samples is not None else rows
            self.stream, self.dataset = StreamSource(self.rows, self._tokenize_row), NoRandomAccess("SQuAD")
            return
        if limit_dataset_samples is not None:
            rows = rows.select(range(min(int(limit_dataset_samples), len(rows))))
        self.rows = rows  # the raw rows: the reference answers of generation_example
        self.dataset = rows.map(
            self._tokenize_row,
            remove_columns=rows.column_names,
            num_proc=1,
            desc=f"Tokenizing SQuAD {split}",
        )

    # -- formatting ---------------------------------------------------------------

    def _prompt_ids(self, context: str, question: str) -> list[int]:
        tok = self.tokenizer
        if self.use_chat_template:
            messages = [{"role": "user", "content": f"Context: {context}\nQuestion: {question}"}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template already spells out its special tokens.
            return tok(text, add_special_tokens=False)["input_ids"]
        ids = tok(f"Context: {context} Question: {question} Answer:", add_special_tokens=True)["input_ids"]
        # Keep a tokenizer's BOS but not an EOS it may append: the answer follows.
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        return ids

    def _answer_ids(self, answer: str) -> list[int]:
        text = answer if self.use_chat_template else " " + answer
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def _tokenize_row(self, row: dict[str, Any]) -> dict[str, list[int]]:
        answers = row["answers"]["text"]
        prompt = self._prompt_ids(row["context"], row["question"])
        answer = self._answer_ids(answers[0] if answers else "")
        return prompt_answer_example(prompt, answer, self.seq_length, self.answer_only_loss)

    # -- Dataset ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        row = self.dataset[int(idx)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def generation_example(self, idx: int) -> GenerationExample:
        """Row ``idx`` as a prompt to answer by generation (formatted as training formats
        it, its last ``seq_length`` tokens) and every reference answer of the row."""
        row = self.rows[int(idx)]
        prompt = self._prompt_ids(row["context"], row["question"])
        return GenerationExample(prompt[-self.seq_length:] if self.seq_length else prompt, list(row["answers"]["text"]))


def make_squad_dataset(
    tokenizer,
    seq_length: int | None = None,
    limit_dataset_samples: int | None = None,
    split: str = "train",
    dataset_name: str = "rajpurkar/squad",
) -> SQuAD:
    """NeMo-compatible factory name for :class:`SQuAD`."""
    return SQuAD(
        path_or_dataset=dataset_name,
        split=split,
        tokenizer=tokenizer,
        seq_length=seq_length,
        limit_dataset_samples=limit_dataset_samples,
    )
