"""SQuAD SFT data set: prompt masking, alignment, truncation, loading.

Runs with a word-level tokenizer built here (no assets), and with the real SmolLM2
tokenizer when ``python -m nemo_pp.assets`` has prepared it.
"""

import functools
import json
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nemo_pp.assets import smollm2_dir
from nemo_pp.datasets.llm.squad import SQuAD, make_squad_dataset

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]

ROWS = [
    {"id": "1", "title": "Super_Bowl", "context": "The Denver Broncos won Super Bowl 50 in Santa Clara, California.",
     "question": "Who won Super Bowl 50?", "answers": {"text": ["Denver Broncos", "The Denver Broncos"], "answer_start": [4, 0]}},
    {"id": "2", "title": "Super_Bowl", "context": "The Denver Broncos won Super Bowl 50 in Santa Clara, California.",
     "question": "Where was Super Bowl 50 played?", "answers": {"text": ["Santa Clara, California"], "answer_start": [40]}},
    {"id": "3", "title": "Rhine", "context": "The Rhine flows from the Swiss Alps to the North Sea.",
     "question": "Where does the Rhine end?", "answers": {"text": ["the North Sea"], "answer_start": [40]}},
    {"id": "4", "title": "Oxygen", "context": "Oxygen is a chemical element with symbol O and atomic number 8.",
     "question": "What is the atomic number of oxygen?", "answers": {"text": ["8"], "answer_start": [62]}},
]
WORD_RE = r"\w+|[^\w\s]"


def _word_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    words = {"Context", "Question", "Answer", "user", "assistant", ":"}
    for r in ROWS:
        for text in (r["context"], r["question"], *r["answers"]["text"]):
            words.update(re.findall(WORD_RE, text))
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="<|im_end|>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _real_tokenizer():
    if not (smollm2_dir() / ".complete").exists():
        pytest.skip("SmolLM2 tokenizer not prepared: run python -m nemo_pp.assets")
    return _load_real_tokenizer(str(smollm2_dir()))


@functools.lru_cache(maxsize=1)
def _load_real_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=["word-chat", "word-plain", "smollm2"])
def tokenizer(request):
    if request.param == "smollm2":
        return _real_tokenizer()
    return _word_tokenizer(chat=request.param == "word-chat")


@pytest.fixture
def squad_folder(tmp_path):
    d = tmp_path / "squad"
    d.mkdir()
    for name, rows in (("train", ROWS[:3]), ("validation", ROWS[3:])):
        with open(d / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return d


def _answer_label_ids(tok, answer, chat):
    text = answer if chat else " " + answer
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _check_alignment(item):
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels)
    # labels[t] is the token after input_ids[t]
    for t in range(len(ids) - 1):
        if labels[t] != -100:
            assert labels[t] == ids[t + 1]


def test_labels_mask_prompt_and_hold_the_answer(tokenizer, squad_folder):
    ds = SQuAD(str(squad_folder), "train", tokenizer=tokenizer)
    chat = bool(tokenizer.chat_template)
    assert len(ds) == 3
    for i, row in enumerate(ROWS[:3]):
        item = ds[i]
        _check_alignment(item)
        labels = item["labels"]
        first = next(t for t, l in enumerate(labels) if l != -100)
        assert all(l == -100 for l in labels[:first])  # whole prompt masked
        answer = labels[first:]
        assert -100 not in answer  # answer is one contiguous block up to the end
        assert answer == _answer_label_ids(tokenizer, row["answers"]["text"][0], chat)
        assert answer[-1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(answer[:-1]).strip()
        expect = row["answers"]["text"][0]
        assert re.findall(WORD_RE, decoded) == re.findall(WORD_RE, expect)


def test_real_tokenizer_decodes_answer_exactly(squad_folder):
    tok = _real_tokenizer()
    ds = SQuAD(str(squad_folder), "train", tokenizer=tok)
    item = ds[1]
    answer = [l for l in item["labels"] if l != -100]
    assert tok.decode(answer) == "Santa Clara, California<|im_end|>"
    prompt_text = tok.decode(item["input_ids"])
    assert prompt_text.startswith("<|im_start|>system")
    assert "<|im_start|>user\nContext: The Denver Broncos" in prompt_text
    assert "\nQuestion: Where was Super Bowl 50 played?<|im_end|>\n<|im_start|>assistant\n" in prompt_text


def test_chat_and_plain_prompt_text(squad_folder):
    chat_tok = _word_tokenizer(chat=True)
    item = SQuAD(str(squad_folder), "train", tokenizer=chat_tok)[0]
    assert chat_tok.convert_ids_to_tokens(item["input_ids"][:2]) == ["<|im_start|>", "user"]
    assert "<|im_start|> assistant" in chat_tok.decode(item["input_ids"])

    plain = SQuAD(str(squad_folder), "train", tokenizer=chat_tok, use_chat_template=False)[0]
    words = " ".join(chat_tok.convert_ids_to_tokens(plain["input_ids"]))
    assert "<|im_start|>" not in words
    assert words.startswith("Context : The Denver")
    assert words.endswith("Question : Who won Super Bowl 50 ? Answer : Denver Broncos")

    with pytest.raises(ValueError, match="chat_template"):
        SQuAD(str(squad_folder), "train", tokenizer=_word_tokenizer(chat=False), use_chat_template=True)


def test_answer_only_loss_false_trains_on_every_token(tokenizer, squad_folder):
    item = SQuAD(str(squad_folder), "train", tokenizer=tokenizer, answer_only_loss=False)[0]
    assert -100 not in item["labels"]
    assert item["labels"][:-1] == item["input_ids"][1:]
    assert item["labels"][-1] == tokenizer.eos_token_id


def test_truncation_keeps_answer(tokenizer, squad_folder):
    full = SQuAD(str(squad_folder), "train", tokenizer=tokenizer)
    seq = 8
    short = SQuAD(str(squad_folder), "train", tokenizer=tokenizer, seq_length=seq)
    for i in range(len(full)):
        a, b = full[i], short[i]
        assert len(b["input_ids"]) == min(seq, len(a["input_ids"]))
        _check_alignment(b)
        # the prompt was cut from the left: the tail is unchanged
        assert b["input_ids"] == a["input_ids"][-len(b["input_ids"]):]
        assert [l for l in b["labels"] if l != -100] == [l for l in a["labels"] if l != -100]


def test_truncation_of_an_answer_longer_than_seq_length(squad_folder):
    tok = _word_tokenizer(chat=True)
    full = SQuAD(str(squad_folder), "train", tokenizer=tok)[1]  # "Santa Clara , California" + eos
    answer = [l for l in full["labels"] if l != -100]
    assert len(answer) == 5
    item = SQuAD(str(squad_folder), "train", tokenizer=tok, seq_length=3)[1]
    assert len(item["input_ids"]) == 3
    assert item["labels"] == answer[:3]  # every kept answer token is still a label
    assert item["input_ids"][1:] == answer[:2]
    with pytest.raises(ValueError, match="seq_length"):
        SQuAD(str(squad_folder), "train", tokenizer=tok, seq_length=0)


def test_splits_from_folder_and_single_file(squad_folder):
    tok = _word_tokenizer(chat=True)
    assert len(SQuAD(str(squad_folder), "train", tokenizer=tok)) == 3
    val = SQuAD(str(squad_folder), "validation", tokenizer=tok)
    assert len(val) == 1
    assert [l for l in val[0]["labels"] if l != -100] == _answer_label_ids(tok, "8", chat=True)
    one_file = SQuAD(str(squad_folder / "train.jsonl"), "train", tokenizer=tok)
    assert len(one_file) == 3
    assert one_file[2] == SQuAD(str(squad_folder), "train", tokenizer=tok)[2]


def test_limit_and_factory(squad_folder):
    tok = _word_tokenizer(chat=False)
    ds = SQuAD(str(squad_folder), "train", tokenizer=tok, limit_dataset_samples=2)
    assert len(ds) == 2
    assert len(SQuAD(str(squad_folder), "train", tokenizer=tok, limit_dataset_samples=99)) == 3
    made = make_squad_dataset(tok, seq_length=6, limit_dataset_samples=1, split="train",
                              dataset_name=str(squad_folder))
    assert isinstance(made, SQuAD) and len(made) == 1 and len(made[0]["input_ids"]) <= 6


def test_missing_path_and_missing_tokenizer(tmp_path, squad_folder):
    tok = _word_tokenizer(chat=True)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        SQuAD(missing, "train", tokenizer=tok)
    assert str(err.value) == (f"dataset path_or_dataset '{missing}' does not exist; "
                              "fetch the offline assets with: python -m nemo_pp.assets")
    with pytest.raises(FileNotFoundError, match="'./no/such/dir'"):
        SQuAD("./no/such/dir", "train", tokenizer=tok)
    with pytest.raises(TypeError, match="tokenizer"):
        SQuAD(str(squad_folder), "train")
