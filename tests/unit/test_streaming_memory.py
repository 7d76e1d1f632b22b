"""A streamed data set holds a few rows at a time: over a 1,000,000-row JSONL (about 57 MB)
the training loader's resident memory stays flat, and its first batch comes at once.

The file has 1M rows; the test reads the first ``READ`` of them through the whole training
path (``datasets``' streaming JSON reader, the data set's own per-row tokenizing ``.map``
with the real SmolLM2 tokenizer, the rank stream, the collator): on 2 shared cores the
tokenizer runs at 1-2 thousand rows per second, so reading all 1M rows would take many
minutes while memory is already flat after the first thousands.
"""

from __future__ import annotations

import time

import pytest

ROWS = 1_000_000
READ = 60_000  # rows read and tokenized
BATCH = 64
WARM = 10_000  # rows before the baseline: the reader's and tokenizer's buffers are allocated by then


@pytest.mark.slow
def test_streaming_memory_stays_flat_and_the_first_batch_is_immediate(tmp_path, real_assets, capsys):
    import datasets  # noqa: F401  (imported before the clock starts: its import is not the data's cost)
    import psutil
    from transformers import AutoTokenizer

    from nemo_pp.datasets.llm.column_mapped_text_instruction_dataset import ColumnMappedTextInstructionDataset
    from nemo_pp.datasets.utils import SFTCollator
    from nemo_pp.training.data import build_stream_loader

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for start in range(0, ROWS, 10_000):
            f.write("".join(f'{{"question": "What is {i} plus {i % 97}?", "answer": "{i + i % 97}"}}\n'
                            for i in range(start, start + 10_000)))
    size_mib = path.stat().st_size / 2**20
    assert size_mib > 50
    tok = AutoTokenizer.from_pretrained(str(real_assets[0]))

    start = time.perf_counter()
    ds = ColumnMappedTextInstructionDataset(str(path), {"question": "question", "answer": "answer"}, tok,
                                            seq_length=64, streaming=True)
    batches = iter(build_stream_loader(ds.stream, BATCH, 1, 0, SFTCollator(pad_token_id=0)))
    first = next(batches)
    first_batch_s = time.perf_counter() - start
    assert first["input_ids"].shape[0] == BATCH

    proc = psutil.Process()
    rss, t0 = {}, time.perf_counter()
    for n in range(2, READ // BATCH + 1):
        next(batches)
        if (n * BATCH) % 5_000 < BATCH:
            rss[n * BATCH] = proc.memory_info().rss / 2**20
    rows_per_s = (READ - BATCH) / (time.perf_counter() - t0)
    base = next(v for k, v in rss.items() if k >= WARM)
    growth = max(rss.values()) - base
    with capsys.disabled():
        print(f"\nstreaming {size_mib:.0f} MiB, {ROWS:,} rows: first batch after {first_batch_s:.2f} s; "
              f"{rows_per_s:.0f} rows/s tokenized (the whole file: ~{ROWS / rows_per_s:.0f} s to tokenize up front); "
              f"RSS MiB by rows read: " + ", ".join(f"{k}: {v:.1f}" for k, v in rss.items())
              + f"; growth after {WARM} rows: {growth:.1f} MiB")
    assert growth < 32, rss
    assert first_batch_s < 30  # map-style would tokenize all 1M rows first (minutes here)
