"""The shape of source/: small functions and modules, imports that flow one way.

Built from the code itself (ast), so a new module or import is checked without a list to update.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "source"
MODULES = {path.stem: path for path in sorted(SOURCE.glob("*.py"))}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# Scripts that are only entry points: no other module imports them.
ENTRY_POINTS = {"train", "test", "export", "serve", "app", "monitor"}
# What serving (the app, the API, predict.py) must never load, directly or through another module.
TRAINING_AND_EXPORT = {"train", "training", "export", "quantize", "onnx_graph", "distill"}
SERVING = {"app", "serve", "predict"}


def imports_of(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # `if TYPE_CHECKING:` imports are for type checkers only; they never run.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {path.stem}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    colour, stack = dict.fromkeys(graph, 0), []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_the_checks_see_a_cycle_and_a_long_function(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path / "m.py") == [f"m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    (tmp_path / "n.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import config\nimport preprocessing\n"
    )
    assert imports_of(tmp_path / "n.py") == {"preprocessing"}


def test_the_graph_is_read_from_the_code():
    assert "config" in GRAPH["train"] and "checkpoint" in GRAPH["predict"]
    assert "torch" not in GRAPH["train"]  # only project modules


def test_no_import_cycle_among_source_modules():
    assert find_cycle(GRAPH) is None


@pytest.mark.parametrize("name", sorted(SERVING))
def test_serving_never_loads_training_or_export_code(name):
    assert not reachable(name, GRAPH) & TRAINING_AND_EXPORT


def test_entry_scripts_are_imported_by_no_module():
    importers = {f"{src} imports {dst}" for src, dsts in GRAPH.items() for dst in dsts}
    assert not {line for line in importers if line.split()[-1] in ENTRY_POINTS}


def test_no_function_longer_than_the_limit():
    assert [line for path in MODULES.values() for line in long_functions(path)] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_the_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}.py has {lines} lines"
