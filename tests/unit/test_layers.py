"""The layers of docs/architecture.md hold: import-linter's contract (pyproject.toml) is
kept, breaking it with one upward import fails it, and no module imports itself back
through others (no cycle at module level, inside a layer either)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this copy of nemo_pp, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contract_is_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "nemo_pp", tmp_path / "nemo_pp", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planning = tmp_path / "nemo_pp" / "planning" / "timeline.py"
    # a function-local import counts as much as a top-level one
    planning.write_text(planning.read_text() + "\n\ndef _upward():\n    from nemo_pp.training import engine  # noqa: F401\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "nemo_pp.planning is not allowed to import nemo_pp.training" in out.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected groups of modules, not counting a package's imports of its own children."""
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if not d.startswith(m + ".")}
             for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return found


def test_no_module_level_import_cycle():
    assert _cycles(grimp.build_graph("nemo_pp", include_external_packages=False)) == []
