"""The house rules of the layout (../shared/DESIGN.md, issue 15), checked on the source text.

- kernels/ (installed as fastdistil.kernels) imports nothing from the rest of the package: Triton code must not
  pull in the model, the backends or fastdistil's __init__ chain.
- ops/ knows no model, padding or head module: an op takes tensors (and LayerWeights), never a model.
- No source file (package, kernels, csrc) over 500 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import statement in `path`; level 0 is absolute, 1 is `.x`, 2 is `..x`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_nothing_from_the_package(path):
    bad = [(lvl, m) for lvl, m in _imports(path) if (lvl == 0 and m.split(".")[0] == "fastdistil") or lvl >= 2]
    assert not bad, f"{path.name} imports from the package: {bad}"


_OPS_MAY_NOT = {"model", "padding", "heads", "patch", "loading", "leftpad"}


@pytest.mark.parametrize("path", sorted((ROOT / "fastdistil" / "ops").glob("*.py")), ids=lambda p: p.name)
def test_ops_know_no_model_or_padding(path):
    bad = []
    for lvl, m in _imports(path):
        name = m.split(".")
        if (lvl == 2 and name[0] in _OPS_MAY_NOT) or (lvl == 0 and name[:1] == ["fastdistil"]
                                                      and len(name) > 1 and name[1] in _OPS_MAY_NOT):
            bad.append(m)
    assert not bad, f"ops/{path.name} imports {bad}"


_SOURCES = sorted(p for d in ("fastdistil", "kernels", "csrc") for p in (ROOT / d).rglob("*")
                  if p.suffix in (".py", ".cpp", ".h"))


@pytest.mark.parametrize("path", _SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_over_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= 500, f"{path.relative_to(ROOT)} has {n} lines: split it by what it does"
