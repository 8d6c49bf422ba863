"""The package's import graph: no cycle between modules or between subpackages (function-level imports
included), every module imports first in a fresh interpreter, light modules do not pull in jax, and no
module is over the file budget.

The graph is read from the source (ast): `import reval_jax.x.y`, `from reval_jax.x import y`, relative
imports, `runpy.run_module("reval_jax....")` / `importlib.import_module("reval_jax....")` with a literal
name, and `from reval_jax import Name` resolved through the package's lazy `_PUBLIC` table. Every edge
keeps where it was written (file:line), so a failure shows the cycle's path and the lines that make it.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import HANG_S, REPO_ROOT

PACKAGE = pathlib.Path(REPO_ROOT) / "reval_jax"
MAX_LINES = 600  # the soft budget of a module (docs/STYLE.md: files <= ~600 lines)
# modules that must stay importable without jax: the reward worker processes, the package's lazy
# front door, the entry points' error handling and every subpackage's map
LIGHT = ["reval_jax", "reval_jax.errors", "reval_jax.data.rewards", "reval_jax.data.templates",
         "reval_jax.model.config", "reval_jax.run.cli", "reval_jax.tools.plot"]
ENTRY_POINTS = ["reval_jax.run.checkpoint", "reval_jax.run.policy", "reval_jax.run.evaluate",
                "reval_jax.run.export", "reval_jax.run.train", "reval_jax.tools.scale", "reval_jax.tools.plot",
                "reval_jax.rollout.engine", "reval_jax.rollout.sampler", "reval_jax.model.hf"]

Edges = dict[str, dict[str, str]]  # module -> {module it imports: "path:line" of the first such import}


def module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_paths(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def public_names(root: pathlib.Path = PACKAGE) -> dict[str, str]:
    """The package's lazy `_PUBLIC` table (name -> module), read from its __init__.py."""
    for node in ast.walk(ast.parse((root / "__init__.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_PUBLIC" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names (modules or module.attribute) one ast node imports."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package (a package's __init__ is its own package)
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # `from x import y`: module x.y, or the attribute y of module x (resolved by the caller)
        yield from (source if a.name == "*" else f"{source}.{a.name}" for a in node.names)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr in ("run_module", "import_module") and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        yield node.args[0].value


def import_graph(root: pathlib.Path = PACKAGE) -> Edges:
    """module -> the package's modules it imports anywhere in it (function-level imports too)."""
    paths = module_paths(root)
    public = {f"{root.name}.{name}": target for name, target in public_names(root).items()}
    graph: Edges = {}
    for module, path in paths.items():
        edges: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported(node, module, path.name == "__init__.py"):
                target = public.get(name, name)
                while target and target not in paths:  # module.attribute -> module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.setdefault(target, f"{path.relative_to(root.parent)}:{node.lineno}")
        graph[module] = edges
    return graph


def subpackage(module: str) -> str:
    """reval_jax.model.decoder -> model; a top-level module (reval_jax.errors, a kept command name) is its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def subpackage_graph(graph: Edges) -> Edges:
    """The module graph collapsed onto subpackages (edges inside one subpackage dropped)."""
    out: Edges = {}
    for module, edges in graph.items():
        here = out.setdefault(subpackage(module), {})
        for target, where in edges.items():
            if subpackage(target) != subpackage(module):
                here.setdefault(subpackage(target), f"{where} ({module} -> {target})")
    return out


def find_cycle(graph: dict) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
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


def all_cycles(graph: Edges) -> list[str]:
    """Every cycle found by removing each found cycle's closing edge in turn, each with its edges' lines."""
    graph = {u: dict(vs) for u, vs in graph.items()}
    found = []
    while cycle := find_cycle(graph):
        hops = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
        found.append(" -> ".join(cycle) + ":\n      " + "\n      ".join(hops))
        del graph[cycle[-2]][cycle[-1]]
    return found


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert len(all_cycles({"a": {"b": "1", "c": "2"}, "b": {"a": "3"}, "c": {"a": "4"}})) == 2


def test_graph_reads_every_kind_of_import(tmp_path):
    """A toy package with each import form, lazy ones included, and a cycle between subpackages."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": '_PUBLIC = {"Thing": "pkg.b.thing"}\n',
        "a/__init__.py": "",
        "a/one.py": "def f():\n    from pkg.b import thing\n",  # function-level
        "a/two.py": "from . import one\nfrom .one import f\n",  # relative
        "b/__init__.py": "from pkg.a.two import f\n",
        "b/thing.py": "import runpy\nrunpy.run_module('pkg.c.cmd')\n",
        "c/__init__.py": "",
        "c/cmd.py": "from pkg import Thing\n",  # through the lazy table
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["pkg.a.one"] == {"pkg.b.thing": "pkg/a/one.py:2"}
    assert set(graph["pkg.a.two"]) == {"pkg.a.one"} and set(graph["pkg.b"]) == {"pkg.a.two"}
    assert set(graph["pkg.b.thing"]) == {"pkg.c.cmd"} and set(graph["pkg.c.cmd"]) == {"pkg.b.thing"}
    assert find_cycle(graph) == ["pkg.b.thing", "pkg.c.cmd", "pkg.b.thing"]
    packages = subpackage_graph(graph)
    assert set(packages["a"]) == {"b"} and set(packages["b"]) == {"a", "c"} and set(packages["c"]) == {"b"}
    assert find_cycle(packages) == ["a", "b", "a"]


def test_import_graph_has_no_cycle_between_modules():
    graph = import_graph()
    assert {"reval_jax.run.train", "reval_jax.model.decoder", "reval_jax.rollout.engine"} <= set(graph)
    cycles = all_cycles(graph)
    assert not cycles, "import cycles between modules:\n  " + "\n  ".join(cycles)
    run_train = "reval_jax.run.train"
    for light in ("reval_jax.run.evaluate", "reval_jax.run.checkpoint", "reval_jax.run.export", "reval_jax.run.policy"):
        assert run_train not in graph[light], light


def test_import_graph_has_no_cycle_between_subpackages():
    cycles = all_cycles(subpackage_graph(import_graph()))
    assert not cycles, "import cycles between subpackages:\n  " + "\n  ".join(cycles)


def test_no_module_is_over_the_line_budget():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    over = sorted(f"{path}: {n} lines" for path, n in sizes.items() if n > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines:\n  " + "\n  ".join(over)


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_S)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_module_imports_first_in_a_fresh_interpreter(module):
    proc = _fresh(f"import {module}")
    assert proc.returncode == 0, proc.stderr


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module of the package imported first, in a child forked from an interpreter that has loaded
    the third-party libraries but nothing of reval_jax (a lazy cycle shows as an ImportError)."""
    code = f"""
import os, sys, traceback
import flax.nnx, jax, ml_collections, numpy, optax  # third-party only: shared by every child
failed = []
for module in {sorted(module_paths())!r}:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(module)
print("FAILED", failed)
sys.exit(bool(failed))
"""
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_jax(module):
    proc = _fresh(f"import sys, {module}; heavy = sorted({{'jax', 'flax'}} & set(sys.modules)); print(heavy)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"{module} imports {proc.stdout.strip()}"


def test_every_subpackage_opens_with_a_map_of_its_files():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        missing = [p.name for p in init.parent.glob("*.py") if p.name != "__init__.py" and p.name not in doc]
        assert not missing, f"{init.relative_to(PACKAGE.parent)}'s docstring does not name {missing}"
