"""SQuAD v1.1 dev from the ``bigbench`` sdist, flattened and split by title into train/validation JSONL."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from nemo_pp.assets.download import pip_download
from nemo_pp.assets.paths import _commit_dir, _fresh_tmp_dir, is_complete, squad_dir

BIGBENCH_SPEC = "bigbench==1.0.0"
BIGBENCH_SDIST_GLOB = "bigbench-1.0.0.tar.gz"
SQUAD_MEMBER_SUFFIX = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"


def flatten_squad(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten the nested SQuAD v1.1 JSON to ``rajpurkar/squad`` rows.

    Args:
        doc: ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
            "answers": [{"text", "answer_start"}]}]}]}]}``.

    Returns:
        One dict per question: ``{"id", "title", "context", "question",
        "answers": {"text": [str], "answer_start": [int]}}``, in file order.

    Raises:
        ValueError: ``doc`` has no ``"data"`` list.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError("not a SQuAD document: expected a dict with a 'data' list")
    rows = []
    for article in doc["data"]:
        title = article["title"]
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                rows.append({
                    "id": str(qa["id"]),
                    "title": title,
                    "context": context,
                    "question": qa["question"],
                    "answers": {
                        "text": [a["text"] for a in qa["answers"]],
                        "answer_start": [int(a["answer_start"]) for a in qa["answers"]],
                    },
                })
    return rows


def validation_titles(titles: Iterable[str]) -> set[str]:
    """Held-out article titles: sorted, every 10th (index % 10 == 9)."""
    return {t for i, t in enumerate(sorted(set(titles))) if i % 10 == 9}


def split_by_title(rows: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, validation) by article title; no article is in both.

    Row order within each split follows the input order.
    """
    held_out = validation_titles(r["title"] for r in rows)
    train = [r for r in rows if r["title"] not in held_out]
    val = [r for r in rows if r["title"] in held_out]
    return train, val


def read_tar_member(archive: Path, suffix: str) -> bytes:
    """Stream a ``.tar.gz`` until the first member whose name ends with ``suffix``.

    Reads sequentially (no index, no full extraction), with a byte progress bar.

    Raises:
        FileNotFoundError: no member matches.
    """
    return read_tar_members(archive, [suffix])[suffix]


def read_tar_members(archive: Path, suffixes: Sequence[str]) -> dict[str, bytes]:
    """The first member ending with each of ``suffixes``, in one sequential pass that
    stops once all are found (with a byte progress bar).

    Raises:
        FileNotFoundError: some suffix matches no member (named).
    """
    from tqdm import tqdm

    found: dict[str, bytes] = {}
    size = archive.stat().st_size
    with open(archive, "rb") as raw, tqdm.wrapattr(
        raw, "read", total=size, desc=f"scanning {archive.name}", unit="B",
        unit_scale=True, unit_divisor=1024, miniters=1,
    ) as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
        for member in tar:
            wanted = [s for s in suffixes if s not in found and member.name.endswith(s)] if member.isfile() else []
            if wanted:
                data = tar.extractfile(member)
                assert data is not None
                found[wanted[0]] = data.read()
                if len(found) == len(suffixes):
                    return found
    missing = [s for s in suffixes if s not in found]
    raise FileNotFoundError(f"{', '.join(missing)} not found in {archive}")


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Write ``rows`` to ``path`` as UTF-8 JSON Lines (one object a line, non-ASCII kept), replacing the file.

    Returns:
        The number of rows written.
    """
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare_squad(force: bool = False) -> Path:
    """Fetch BIG-bench's copy of SQuAD v1.1 dev and write train/validation JSONL.

    No-op (returns at once) when the folder is marked complete and ``force`` is False.

    Returns:
        ``squad_dir()``, holding ``train.jsonl`` and ``validation.jsonl``.

    Raises:
        RuntimeError: the sdist could not be fetched.
        FileNotFoundError: the sdist does not contain the SQuAD file.
    """
    final = squad_dir()
    if is_complete(final) and not force:
        print(f"[assets] squad ready: {final}", flush=True)
        return final

    t0 = time.perf_counter()
    sdist = pip_download(BIGBENCH_SPEC, BIGBENCH_SDIST_GLOB, sdist=True,
                         retry_hint="--only squad", index_fallback=True)
    t_download = time.perf_counter() - t0

    t1 = time.perf_counter()
    doc = json.loads(read_tar_member(sdist, SQUAD_MEMBER_SUFFIX))
    rows = flatten_squad(doc)
    train, val = split_by_title(rows)
    tmp = _fresh_tmp_dir(final)
    try:
        n_train = write_jsonl(train, tmp / "train.jsonl")
        n_val = write_jsonl(val, tmp / "validation.jsonl")
        titles = sorted({r["title"] for r in val})
        _commit_dir(tmp, final, {"source": f"{BIGBENCH_SPEC}:{SQUAD_MEMBER_SUFFIX}",
                                 "rows": {"train": n_train, "validation": n_val},
                                 "validation_titles": titles})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"[assets] squad saved to {final}: {len(rows)} rows -> train {n_train}, "
        f"validation {n_val} ({len(titles)} of {len({r['title'] for r in rows})} articles); "
        f"download {t_download:.1f} s, extraction {time.perf_counter() - t1:.1f} s",
        flush=True,
    )
    return final
