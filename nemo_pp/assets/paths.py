"""Asset cache layout, local-path checks and the atomic folder commit shared by the preparers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

HOME_ENV = "NEMO_PP_HOME"
MARKER = ".complete"
RETRY_COMMAND = "python -m nemo_pp.assets"


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
