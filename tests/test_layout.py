"""The package layout of DESIGN.md, enforced: no import circles, lower layers never import
higher ones.

Every ``import`` in ``owm/`` counts, at module level or inside a function (a late import is
still a dependency; it only hides a circle from Python's loader). Only imports under
``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "owm"

# What each package may import besides itself. Lower layers first.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "testbed": {"common"},
    "storage": {"common"},
    "locks": {"common"},
    "catalog": {"common"},
    "engine": {"common", "storage", "locks"},
    "pool": {"common", "storage", "locks", "catalog", "engine"},
    "cluster": {"common", "storage", "locks", "catalog", "engine", "pool"},
    "nbd": {"common"},
    "control": {"common", "locks"},
    "daemon": {"common", "storage", "catalog", "pool", "cluster", "nbd", "control", "locks"},
    "backup": {"common", "nbd", "control"},
    "txn": {"common", "locks", "nbd", "control"},
    "cli": {"common", "nbd", "control", "backup", "txn", "daemon", "locks", "testbed"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The owm modules ``name`` imports, wherever in the file the import stands."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "owm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "owm":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    found.discard(name)
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(edges[node]):
            if colour[nxt] == grey:
                return [*stack[stack.index(nxt):], nxt]
            if colour[nxt] == white and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(edges):
        if colour[node] == white and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_circle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for src, dsts in graph().items():
        a = layer_of(src)
        edges.setdefault(a, set()).update(layer_of(d) for d in dsts if layer_of(d) != a)
    for deps in list(edges.values()):
        for d in deps:
            edges.setdefault(d, set())
    cycle = find_cycle(edges)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle or [])


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    edges = graph()
    # ``owm`` itself (the version) is below everything, so it must import nothing.
    assert edges["owm"] == set()
    for src, dsts in edges.items():
        a = layer_of(src)
        if a not in ALLOWED:  # owm/__init__.py, owm/__main__.py: the entry points
            continue
        for d in sorted(dsts):
            b = layer_of(d)
            if b not in (a, "") and b not in ALLOWED[a]:
                wrong.append(f"{src} imports {d}")
    assert not wrong, "layering broken: " + "; ".join(wrong)


def test_every_package_is_listed_and_documented() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(ALLOWED), "add the new package to ALLOWED with what it may import"
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top <= {"__init__", "__main__"}, f"modules outside a layer: {sorted(top)}"
    for path in ROOT.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(ROOT.parent)} has no docstring saying its job"


def test_the_checker_catches_a_planted_circle() -> None:
    edges = {"owm.a": {"owm.b"}, "owm.b": {"owm.c"}, "owm.c": {"owm.a"}}
    assert find_cycle(edges) == ["owm.a", "owm.b", "owm.c", "owm.a"]
    assert find_cycle({"owm.a": {"owm.b"}, "owm.b": set()}) is None


@pytest.mark.parametrize("code, expected", [
    ("def f():\n    from owm.cli.main import Fail\n", {"owm.cli.main"}),
    ("from owm.control import routes\n", {"owm.control.routes"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import owm.cli.main\n", set()),
])
def test_late_imports_count(tmp_path: Path, code: str, expected: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(code)
    modules = all_modules()
    assert imports_of("owm.x.m", path, modules) == expected
