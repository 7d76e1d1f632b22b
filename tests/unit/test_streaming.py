"""Streamed data sets (``dataset.streaming: true``): the real ``datasets`` streaming reader over
files the tests write, the real SmolLM2 tokenizer, the recipe's loader functions.

Each case compares a stream against what the map-style data set (or PackedSequenceDataset)
makes of the same rows, or a stopped-and-restored stream against one read straight through.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from nemo_pp.datasets.llm.column_mapped_text_instruction_dataset import ColumnMappedTextInstructionDataset
from nemo_pp.datasets.llm.column_mapped_text_instruction_iterable_dataset import (
    ColumnMappedTextInstructionIterableDataset,
)
from nemo_pp.datasets.packed_sequence import PackedSequenceDataset
from nemo_pp.datasets.streaming import RankStream, StreamPosition
from nemo_pp.datasets.utils import SFTCollator
from nemo_pp.training.data import build_stream_loader, restore_stream, stream_checkpoint_state

MAPPING = {"context": "c", "question": "q", "answer": "a"}
N = 37  # rows: not a multiple of 2 or 4, so the ranks' whole blocks drop a tail


def _row(i: int) -> dict:
    return {"c": "Context " + "word " * (i % 7), "q": f"Question number {i}?", "a": f"answer {i}"}


@pytest.fixture(scope="module")
def tok(real_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_assets[0]))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "rows.jsonl"
    path.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(N)))
    return str(path)


@pytest.fixture(scope="module")
def mapped(data_file, tok):
    ds = ColumnMappedTextInstructionDataset(data_file, MAPPING, tok, seq_length=24)
    return [ds[i] for i in range(len(ds))]


def _stream(data_file, tok, **kw):
    return ColumnMappedTextInstructionDataset(data_file, MAPPING, tok, seq_length=24, streaming=True, **kw)


def _take(stream: RankStream, n: int) -> list[dict]:
    return list(itertools.islice(iter(stream), n))


def test_a_stream_yields_the_map_style_rows_in_file_order(data_file, tok, mapped):
    ds = _stream(data_file, tok)
    assert list(ds) == mapped
    assert list(_stream(data_file, tok, limit_dataset_samples=5)) == mapped[:5]
    with pytest.raises(TypeError, match="no length"):
        len(ds)
    alias = ColumnMappedTextInstructionIterableDataset(data_file, MAPPING, tok, seq_length=24, repeat_on_exhaustion=False)
    assert isinstance(alias, torch.utils.data.IterableDataset) and list(alias) == mapped


def test_squad_streams_the_rows_it_maps(real_assets, tok):
    from nemo_pp.datasets.llm.squad import SQuAD

    squad = str(real_assets[1])
    m = SQuAD(squad, tokenizer=tok, seq_length=64, limit_dataset_samples=12)
    s = SQuAD(squad, tokenizer=tok, seq_length=64, limit_dataset_samples=12, streaming=True)
    assert list(s) == [m[i] for i in range(12)]


@pytest.mark.parametrize("dp", [2, 4])
def test_each_dp_rank_reads_every_dp_th_row_of_whole_blocks(data_file, tok, mapped, dp):
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    ds = _stream(data_file, tok)
    whole = N // dp * dp
    shards = [_take(RankStream(ds.stream, dp, r), whole // dp) for r in range(dp)]
    for r in range(dp):
        assert shards[r] == mapped[r:whole:dp]
    # split_dataset_by_node's one-file rule (rank r keeps rows r, r + dp, ...) without the tail
    raw = load_dataset("json", data_files=data_file, split="train", streaming=True)
    assert [x["q"] for x in split_dataset_by_node(raw, rank=1, world_size=dp)][: whole // dp] == \
        [_row(i)["q"] for i in range(1, whole, dp)]
    # the global order, rank by rank, is the file order
    assert [shards[r][i] for i in range(whole // dp) for r in range(dp)] == mapped[:whole]


def test_the_row_index_filter_selects_what_split_dataset_by_node_selects(data_file):
    """The selection on a datasets release without split_dataset_by_node(strategy=...)."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    from nemo_pp.datasets.streaming import every_nth_row

    raw = load_dataset("json", data_files=data_file, split="train", streaming=True)
    for dp, rank in ((2, 0), (2, 1), (4, 3)):
        assert [x["q"] for x in every_nth_row(raw, dp, rank)] == \
            [x["q"] for x in split_dataset_by_node(raw, rank=rank, world_size=dp, strategy="examples")]


def test_a_checkpoint_of_ranks_passes_apart_takes_dp_rank_0s_folder_and_position():
    from nemo_pp.training.data import agreed_stream_position

    state = {"data_stream": {"dp_size": 2, "packed_sequence_size": 64,
                             "ranks": [{"epoch": 3, "rows": 4}, {"epoch": 4, "rows": 1}]}}
    assert agreed_stream_position(state) == (3, 8)
    assert agreed_stream_position({}) is None


def test_a_pass_that_ends_starts_the_next(data_file, tok, mapped):
    stream = RankStream(_stream(data_file, tok).stream, 2, 1)
    items = _take(stream, 18 + 5)  # 18 rows per pass for rank 1 (36 whole rows of 37)
    assert items == mapped[1:36:2] + mapped[1:11:2]
    assert stream.position == StreamPosition(1, 5)


@pytest.mark.parametrize("dp", [1, 2])
def test_packing_on_the_fly_equals_packed_sequence_dataset(data_file, tok, mapped, dp):
    ds = _stream(data_file, tok)
    for rank in range(dp):
        rows = mapped[rank: N // dp * dp: dp]
        packed = PackedSequenceDataset(rows, 64)
        stream = RankStream(ds.stream, dp, rank, packed_sequence_size=64)
        assert _take(stream, len(packed)) == [packed[i] for i in range(len(packed))]
        assert stream.position == StreamPosition(0, len(rows))


def _loader(ds, dp, rank, pack=0):
    collate = SFTCollator(pad_token_id=0, pad_seq_len_divisible=pack or None)
    return build_stream_loader(ds.stream, 3, dp, rank, collate, pack)


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _trainer_state(loader) -> dict:
    """What the recipe saves: its TrainingPosition (from the stream) and the stream's record."""
    stream = loader.dataset
    return {"epoch": stream.position.epoch, "samples_in_epoch": stream.global_samples(),
            **stream_checkpoint_state(loader)}


@pytest.mark.parametrize("pack", [0, 64])
@pytest.mark.parametrize("stop", [2, 7, 15])  # mid-pass, and after the stream wrapped into its next pass
def test_a_restored_stream_continues_with_the_same_batches(data_file, tok, pack, stop):
    ds = _stream(data_file, tok)
    straight = _batches(_loader(ds, 1, 0, pack), stop + 6)
    first = _loader(ds, 1, 0, pack)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(_batches(first, stop), straight) for k in a)
    state = json.loads(json.dumps(_trainer_state(first)))  # as trainer_state.json holds it
    resumed = _loader(ds, 1, 0, pack)
    restore_stream(resumed, state)
    for a, b in zip(_batches(resumed, 6), straight[stop:]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unpacked_stream_resumes_exactly_at_another_dp_size(data_file, tok, mapped):
    """Two ranks read 4 batches of 3 (24 global samples); four ranks go on from sample 24."""
    ds = _stream(data_file, tok)
    two = [_loader(ds, 2, r) for r in range(2)]
    for loader in two:
        _batches(loader, 4)
    state = {"epoch": 0, "samples_in_epoch": two[0].dataset.global_samples()}
    assert state["samples_in_epoch"] == 24
    four = [_loader(ds, 4, r) for r in range(4)]
    for loader in four:
        restore_stream(loader, state)
    shards = [_take(loader.dataset, 2) for loader in four]  # 8 more whole rows: 24..31
    assert [shards[r][i] for i in range(2) for r in range(4)] == mapped[24:32]


def _config(*overrides: str):
    from nemo_pp.planning.schema import load_recipe_config
    from tests.helpers import RECIPE_CONFIG

    return load_recipe_config(RECIPE_CONFIG, ["--dataset.streaming=true", "--dataloader.shuffle=false", *overrides])


@pytest.mark.parametrize("overrides, match", [
    (["--step_scheduler.max_steps=null"], "step_scheduler.max_steps"),
    (["--dataloader.shuffle=true"], "dataloader.shuffle"),
    (["--dataloader.num_workers=2"], "dataloader.num_workers"),
    (["--dataset.split=train[:90%]"], "dataset.split"),
    (["+dataset.repeat_on_exhaustion=false"], "dataset.repeat_on_exhaustion"),
    (["+validation_dataset.streaming=true"], "validation_dataset.streaming"),
    (["--dataset._target_=nemo_pp.datasets.llm.chat_dataset.ChatDataset"], "dataset.streaming: true, but"),
    (["--dataset._target_=nemo_pp.datasets.vlm.datasets.make_vlm_dataset"], "dataset.streaming: true, but"),
])
def test_the_plan_refuses_what_a_stream_cannot_do(overrides, match):
    from nemo_pp.planning.checks import check_streaming

    assert check_streaming(_config()) is True
    with pytest.raises(ValueError, match=match):
        check_streaming(_config(*overrides))


def test_a_resume_the_stream_cannot_continue_is_refused(tmp_path):
    from nemo_pp.planning.checks import STREAM_STATE_KEY, check_stream_resume

    packed = {STREAM_STATE_KEY: {"dp_size": 2, "packed_sequence_size": 64, "ranks": [{"epoch": 0, "rows": 5}] * 2}}
    cfg = _config("--packed_sequence.packed_sequence_size=64")
    check_stream_resume(cfg, packed, tmp_path, 2)  # the same dp size and rows: fine
    with pytest.raises(ValueError, match="distributed.dp_size=2"):
        check_stream_resume(cfg, packed, tmp_path, 4)
    with pytest.raises(ValueError, match="packed_sequence.packed_sequence_size=64"):
        check_stream_resume(_config(), packed, tmp_path, 2)
    unpacked = {STREAM_STATE_KEY: {"dp_size": 2, "packed_sequence_size": 0, "ranks": []}}
    check_stream_resume(_config(), unpacked, tmp_path, 4)  # unpacked: any dp size
    with pytest.raises(ValueError, match="dataset.streaming"):
        check_stream_resume(_config("--dataset.streaming=false"), unpacked, tmp_path, 2)
    with pytest.raises(ValueError, match="dataset.streaming"):
        check_stream_resume(_config(), {"step": 3, "epoch": 0, "samples_in_epoch": 6}, tmp_path, 2)


def test_bad_streams_are_refused_with_the_key(tmp_path, data_file, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        _stream(str(empty), tok)
    with pytest.raises(ValueError, match="dataset.split"):
        _stream(data_file, tok, split="train[:50%]")
    with pytest.raises(ValueError, match="no column 'x'"):
        ColumnMappedTextInstructionDataset(data_file, {"question": "q", "answer": "x"}, tok, streaming=True)
    with pytest.raises(ValueError, match="always streams"):
        ColumnMappedTextInstructionIterableDataset(data_file, MAPPING, tok, streaming=False)
    few = tmp_path / "one.jsonl"
    few.write_text(json.dumps(_row(0)) + "\n")
    with pytest.raises(ValueError, match="fewer rows than the 2 ranks"):
        _take(RankStream(_stream(str(few), tok).stream, 2, 0), 1)
