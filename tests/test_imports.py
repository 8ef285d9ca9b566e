"""Every module imports on its own, in a fresh interpreter, and the package has no import cycle.

A user's first line (`from mllm_cl.module import MLLMModule`) once failed in a fresh interpreter
while the suite passed, because an earlier test file had imported the modules in a lucky order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mllm_cl", "strategies")


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] != "__main__":
                found[".".join(parts)] = path
    return found


def import_edges(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that importing `name` runs: every import statement (function-local ones
    too, they run sooner or later) and the parent packages Python initialises on the way."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    edges = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        while target:  # importing a.b.c initialises a and a.b first
            if target in known and target != name and not name.startswith(target + "."):
                edges.add(target)
            target = target.rpartition(".")[0]
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    modules = project_modules()
    graph = {name: import_edges(name, path, set(modules)) for name, path in modules.items()}
    assert graph["mllm_cl.module"], "the graph builder found no edges; it is broken"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_users_first_import_in_a_fresh_interpreter():
    code = "from mllm_cl.module import MLLMModule; print(MLLMModule.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "MLLMModule"


def test_every_module_imports_alone():
    """Each module is imported first, in a child forked from an interpreter that has loaded the heavy
    third-party packages but none of ours: the order our modules initialise in is exactly a fresh
    interpreter's, at a fraction of the cost of one interpreter per module."""
    script = textwrap.dedent(
        f"""
        import os, sys, traceback
        import torch, transformers, lightning, datasets, torchmetrics, jsonargparse, peft, matplotlib
        ours = {PACKAGES!r}
        assert not [m for m in sys.modules if m.split(".")[0] in ours], "parent imported our modules"
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    __import__(name)
                    os._exit(0)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED:" + ",".join(failed))
        """
    )
    names = sorted(project_modules())
    out = subprocess.run(
        [sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "FAILED:", out.stderr[-3000:]
    assert len(names) > 30


def local_imports_of_ours(path: Path) -> list[str]:
    """`module (line)` for each import of our own packages inside a function body."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + (node.module or "")]
                found += [f"{n} (line {node.lineno})" for n in names if n.startswith((*PACKAGES, "."))]
    return found


def test_no_function_local_import_of_our_own_modules():
    """Deferred imports of our own modules are how the old import cycle hid; with no cycle none is needed
    (third-party heavy imports such as datasets or matplotlib may still be deferred)."""
    offenders = {
        name: hits for name, path in project_modules().items() if (hits := local_imports_of_ours(path))
    }
    assert not offenders, offenders


def test_local_import_finder_sees_one(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    import json\n    from mllm_cl.errors import ConfigError\n")
    assert local_imports_of_ours(path) == ["mllm_cl.errors (line 5)"]
