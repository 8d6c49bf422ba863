"""The package's import graph has no cycles: each module imports in a fresh interpreter, first."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import HANG_S, REPO_ROOT

PACKAGE = pathlib.Path(REPO_ROOT) / "reval_jax"


def import_graph() -> dict[str, set[str]]:
    """module -> the reval_jax modules it imports anywhere in it (function-level imports too)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "reval_jax":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reval_jax."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("reval_jax.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, on_path = set(), []

    def visit(u):
        on_path.append(u)
        for v in sorted(graph.get(u, ())):
            if v in on_path:
                return on_path[on_path.index(v):] + [v]
            if v not in done and (cycle := visit(v)):
                return cycle
        on_path.pop()
        done.add(u)
        return None

    for u in sorted(graph):
        if u not in done and (cycle := visit(u)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"train", "checkpoint", "evaluate", "export", "policy"} <= set(graph)
    assert find_cycle(graph) is None
    assert "train" not in graph["evaluate"] | graph["checkpoint"] | graph["export"] | graph["policy"]


@pytest.mark.parametrize("module", ["checkpoint", "policy", "evaluate", "export", "train"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
    proc = subprocess.run([sys.executable, "-c", f"import reval_jax.{module}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
