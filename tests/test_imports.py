"""The package's modules import one another one way: no module imports (at the top or inside a
function) a module that imports it back, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_grass"


def _exported() -> dict[str, str]:
    """The names ``hf_grass/__init__.py`` imports from its modules: name -> module."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    return {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names
    }


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from .x import``, ``from hf_grass.x import``,
    ``from . import x``, ``from hf_grass import name``: the module defining ``name``), leaving
    out ``if TYPE_CHECKING:`` blocks."""
    exported = _exported()
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in type_only:
            continue
        if node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
        elif node.module and node.module.startswith("hf_grass."):
            names = [node.module.removeprefix("hf_grass.")]
        elif node.module == "hf_grass":
            names = [exported.get(a.name, a.name) for a in node.names]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in modules}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    paths = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {name: _imported_modules(path, set(paths)) - {name} for name, path in paths.items()}
    assert sum(len(deps) for deps in graph.values()) > 50  # the walk reads real imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
