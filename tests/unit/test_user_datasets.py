"""The user's own data: column-mapped instruction tables, chats and plain text, from files
the tests write, tokenized by the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest

from nemo_pp.datasets.llm.chat_dataset import ChatDataset
from nemo_pp.datasets.llm.column_mapped_text_instruction_dataset import ColumnMappedTextInstructionDataset
from nemo_pp.datasets.llm.plain_text_dataset import PlainTextDataset

ROWS = [
    {"definition": "Answer the question.", "inputs": "What is the capital of France?", "targets": ["Paris"]},
    {"definition": "Answer the question.", "inputs": "How many legs has a spider?", "targets": ["Eight"]},
    {"definition": "Translate to French.", "inputs": "cat", "targets": ["chat"]},
]
MAPPING = {"context": "definition", "question": "inputs", "answer": "targets"}


@pytest.fixture(scope="module")
def tok(real_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_assets[0]))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answer(tok, item) -> str:
    return tok.decode([t for t in item["labels"] if t != -100])


def _aligned(item) -> bool:
    ids, labels = item["input_ids"], item["labels"]
    return len(ids) == len(labels) and all(lb == ids[t + 1] for t, lb in enumerate(labels[:-1]) if lb != -100)


def test_column_mapped_rows_train_on_the_answer(tmp_path, tok):
    ds = ColumnMappedTextInstructionDataset(str(_jsonl(tmp_path / "d.jsonl", ROWS)), MAPPING, tok)
    assert len(ds) == 3
    for item, row in zip(ds, ROWS):
        assert _answer(tok, item) == " " + row["targets"][0] + tok.eos_token
        assert _aligned(item)
        assert tok.decode(item["input_ids"]).startswith(f"{row['definition']} {row['inputs']}")


def test_column_mapped_reads_csv_parquet_folders_and_split_slices(tmp_path, tok):
    import datasets

    flat = [{**r, "targets": r["targets"][0]} for r in ROWS]
    table = datasets.Dataset.from_list(flat)
    table.to_csv(str(tmp_path / "d.csv"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    want = [ColumnMappedTextInstructionDataset(str(_jsonl(tmp_path / "d.jsonl", ROWS)), MAPPING, tok)[i] for i in range(3)]
    for name in ("d.csv", "d.parquet"):
        ds = ColumnMappedTextInstructionDataset(str(tmp_path / name), MAPPING, tok)
        assert [ds[i] for i in range(3)] == want, name
    folder = tmp_path / "folder"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS[:2])
    _jsonl(folder / "validation.jsonl", ROWS[2:])
    assert len(ColumnMappedTextInstructionDataset(str(folder), MAPPING, tok, split="validation")) == 1
    sliced = ColumnMappedTextInstructionDataset(str(tmp_path / "d.jsonl"), MAPPING, tok, split="train[1:]")
    assert [sliced[i] for i in range(2)] == want[1:]


def test_column_mapped_chat_template_and_truncation_keep_the_answer(tmp_path, tok):
    path = str(_jsonl(tmp_path / "d.jsonl", ROWS))
    ds = ColumnMappedTextInstructionDataset(path, MAPPING, tok, use_hf_chat_template=True)
    assert tok.decode(ds[0]["input_ids"]).endswith("<|im_start|>assistant\nParis")
    assert _answer(tok, ds[0]) == "Paris" + tok.eos_token
    short = ColumnMappedTextInstructionDataset(path, MAPPING, tok, seq_length=6)
    assert len(short[0]["input_ids"]) == 6 and _answer(tok, short[0]) == " Paris" + tok.eos_token


@pytest.mark.parametrize(
    "mapping,message",
    [({"context": "definition", "question": "inputs", "answer": "output"},
      r"no column 'output' \(for answer\); its columns are \['definition', 'inputs', 'targets'\]"),
     ({"question": "inputs"}, r"missing \['answer'\]"),
     ({"question": "inputs", "answer": "targets", "instruction": "definition"}, r"unknown roles \['instruction'\]")],
)
def test_column_mapped_bad_mapping_names_the_key(tmp_path, tok, mapping, message):
    with pytest.raises(ValueError, match=message):
        ColumnMappedTextInstructionDataset(str(_jsonl(tmp_path / "d.jsonl", ROWS)), mapping, tok)


def test_unreadable_format_missing_path_and_empty_split(tmp_path, tok):
    (tmp_path / "d.xlsx").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"dataset.path_or_dataset_id: cannot read .*d.xlsx: unknown format '.xlsx'"):
        ColumnMappedTextInstructionDataset(str(tmp_path / "d.xlsx"), MAPPING, tok)
    with pytest.raises(FileNotFoundError, match="dataset.path_or_dataset_id"):
        ColumnMappedTextInstructionDataset(str(tmp_path / "nope.jsonl"), MAPPING, tok)
    path = str(_jsonl(tmp_path / "d.jsonl", ROWS))
    with pytest.raises(ValueError, match=r"split 'train\[3:\]' of .* has no rows"):
        ColumnMappedTextInstructionDataset(path, MAPPING, tok, split="train[3:]")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"split 'train' of .*empty.jsonl has no rows"):
        ColumnMappedTextInstructionDataset(str(tmp_path / "empty.jsonl"), MAPPING, tok)
    (tmp_path / "broken.jsonl").write_text('{"definition": "x", "inputs": ')
    with pytest.raises(ValueError, match=r"dataset.path_or_dataset_id: cannot read .*broken.jsonl"):
        ColumnMappedTextInstructionDataset(str(tmp_path / "broken.jsonl"), MAPPING, tok)
    folder = tmp_path / "folder"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"has no split 'validation'"):
        ColumnMappedTextInstructionDataset(str(folder), MAPPING, tok, split="validation")


CHATS = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
]


def test_chat_trains_on_every_assistant_turn_only(tmp_path, tok):
    ds = ChatDataset(str(_jsonl(tmp_path / "c.jsonl", CHATS)), tok)
    assert len(ds) == 2
    first = ds[0]
    assert _aligned(first)
    labelled = [t for t in first["labels"] if t != -100]
    # both assistant turns with their end-of-turn marks; no user text, no role header
    assert tok.decode(labelled) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    assert "Capital of France?" in tok.decode(first["input_ids"])
    assert tok.decode([t for t in ds[1]["labels"] if t != -100]) == "Hello!<|im_end|>\n"


def test_chat_rows_without_an_assistant_are_counted_or_skipped(tmp_path, tok):
    rows = CHATS + [{"messages": [{"role": "user", "content": "anyone?"}]},
                    {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}]
    path = str(_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(ValueError, match=r"2 of 4 rows cannot be trained on \(first: row 2, no assistant turn\)"
                                         r".*dataset.skip_invalid_samples: true"):
        ChatDataset(path, tok)
    assert len(ChatDataset(path, tok, skip_invalid_samples=True)) == 2
    with pytest.raises(ValueError, match=r"dataset.messages_column: the data has no column 'conversation'"):
        ChatDataset(path, tok, messages_column="conversation")


def test_chat_truncation_drops_chats_without_assistant_tokens(tmp_path, tok):
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    ds = ChatDataset(str(_jsonl(tmp_path / "c.jsonl", CHATS + [long_user])), tok, seq_length=64)
    assert len(ds) == 2 and all(len(item["input_ids"]) <= 64 for item in ds)
    with pytest.raises(ValueError, match="no chat keeps an assistant token within seq_length=64"):
        ChatDataset(str(_jsonl(tmp_path / "l.jsonl", [long_user])), tok, seq_length=64)


def test_plain_text_blocks_are_the_token_stream(tmp_path, tok):
    text_a = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n\nRough winds do shake.\n"
    text_b = "So long as men can breathe or eyes can see,\nSo long lives this, and this gives life to thee.\n"
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(text_a)
    (folder / "b.txt").write_text(text_b)
    ds = PlainTextDataset(str(folder), tok, seq_length=8)
    docs = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.", "Rough winds do shake.",
            "So long as men can breathe or eyes can see,\nSo long lives this, and this gives life to thee."]
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(ds) == len(stream) // 9
    for i in range(len(ds)):
        assert ds[i]["input_ids"] == stream[9 * i: 9 * i + 8] and ds[i]["labels"] == stream[9 * i + 1: 9 * i + 9]
    assert len(PlainTextDataset(str(folder), tok, seq_length=8, limit_dataset_samples=2)) == 2
    with pytest.raises(ValueError, match="fewer than one block"):
        PlainTextDataset(str(folder / "b.txt"), tok, seq_length=512)
    with pytest.raises(ValueError, match="dataset.seq_length is required"):
        PlainTextDataset(str(folder), tok)


def test_plain_text_from_a_table_column(tmp_path, tok):
    path = str(_jsonl(tmp_path / "t.jsonl", [{"body": "one two three four five six seven eight nine ten"}]))
    assert len(PlainTextDataset(path, tok, seq_length=4, text_column="body")) == 2
    with pytest.raises(ValueError, match=r"dataset.text_column: the data has no column 'text'; its columns are \['body'\]"):
        PlainTextDataset(path, tok, seq_length=4)
