"""Imports point one way: deploy -> router -> cluster -> workers -> parallel.

Every .py file under those folders is parsed (not imported) and each import -- at the top of
the module or lazily inside a function -- is checked: a module may import its own layer or a
lower one, never a higher one. tests/router/test_imports.py checks the other half of the rule
that needs a running interpreter (router/ and deploy/ stay torch-free at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("deploy", "router", "cluster", "workers", "parallel")  # highest first


def _imported(tree: ast.AST, package: list[str]) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `tree`; relative ones resolved from
    `package`, the importing module's package as a list of names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
    return found


def layer_violations() -> list[str]:
    bad = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT)
            package = list(rel.parent.parts)
            for line, mod in _imported(ast.parse(path.read_text(), str(rel)), package):
                top = mod.split(".")[0]
                if top in LAYERS and LAYERS.index(top) < rank:
                    bad.append(f"{rel}:{line}: {layer}/ imports {mod} (a higher layer)")
    return bad


def test_resolves_relative_imports():
    tree = ast.parse("from . import a\nfrom ..b import c\nimport d.e\n")
    assert [m for _, m in _imported(tree, ["workers", "kernels"])] == [
        "workers.kernels",
        "workers.b",
        "d.e",
    ]


def test_no_layer_imports_a_higher_one():
    assert layer_violations() == []
