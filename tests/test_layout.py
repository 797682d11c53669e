"""The package's tree is its architecture: each layer imports only the layers below it, with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "api"
SHARED = {"config", "errors", "outcomes", "keyring"}
# What each part of the package may import, besides itself and the shared modules.
ALLOWED: dict[str, set[str]] = {
    "store": set(),
    "upstream": set(),
    "turn": {"store", "upstream"},
    "ops": {"turn", "store", "upstream"},
    "http": {"turn", "store", "upstream", "ops"},
    "dev": {"http", "turn", "store", "upstream", "ops", "main"},
    "config": set(),
    "keyring": set(),
    "outcomes": set(),
    "errors": {"outcomes"},
    # The entry points: the console script loads `http` or `dev` only for the command that needs it.
    "cli": {"http", "dev", "client"},
    # The terminal client speaks to the API over HTTP alone, like any other client.
    "client": set(),
    "main": {"http", "ops"},
    "__main__": {"cli"},
    "__init__": set(),
}


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports() -> dict[str, set[str]]:
    """Each module of the package (dotted) and the package modules it imports, at any depth."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("api", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "api":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "api")
        graph[module] = found
    return graph


def test_each_part_imports_only_what_its_layer_may() -> None:
    wrong = []
    for module, targets in imports().items():
        part = part_of(module)
        assert part in ALLOWED, f"{module}: a new part of the package; give it a place in the layers"
        for target in targets:
            other = part_of(target)
            if other != part and other not in SHARED | ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_production_code_never_imports_the_dev_tools() -> None:
    for module, targets in imports().items():
        if part_of(module) not in {"dev", "cli"}:
            assert not any(part_of(t) == "dev" for t in targets), module
