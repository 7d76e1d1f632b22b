"""Every public definition of nemo_pp (module-level functions and classes, and their
public methods and properties) has a docstring."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_pp"


def _undocumented(nodes, where: str, prefix: str = ""):
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                yield f"{where}:{node.lineno} {prefix}{node.name}"
            if isinstance(node, ast.ClassDef):
                yield from _undocumented(node.body, where, f"{prefix}{node.name}.")


def test_every_public_definition_has_a_docstring():
    missing = [entry for path in sorted(PACKAGE.rglob("*.py"))
               for entry in _undocumented(ast.parse(path.read_text()).body, str(path.relative_to(PACKAGE.parent)))]
    assert missing == []
