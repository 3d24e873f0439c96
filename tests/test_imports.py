"""The package's modules form no import cycle, counting imports inside functions, and each imports alone.

A cycle hidden in a function-level import works until someone calls things in another order; each module
importing alone (no other vlmtune module imported first) catches a module that only works because another
one happened to be imported before it. The third-party stack (torch, transformers, ...) is imported once in
this process and each vlmtune module is then imported in a forked child, which keeps the check fast.
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlmtune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """vlmtune modules `path` imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    module = tmp_path / "m.py"
    module.write_text("import vlmtune.x\ndef f():\n    from vlmtune.y import thing\n")
    assert imported_modules(module, {"vlmtune.x", "vlmtune.y"}) == {"vlmtune.x", "vlmtune.y"}


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the walk sees the package
    assert find_cycle(graph) is None


ALONE = """
import os, sys
import torch, transformers, peft, deepspeed, datasets, pandas, mmengine  # the stack, once, before forking
failures = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # the child: no vlmtune module imported yet
        try:
            __import__(name)
            code = 0
        except BaseException as e:
            sys.stderr.write(f"{name}: {type(e).__name__}: {e}\\n")
            code = 1
        os._exit(code)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failures.append(name)
print("FAILED: " + " ".join(failures))
"""


def test_every_module_imports_alone():
    """Each module in a forked child of a fresh interpreter that has imported no vlmtune module."""
    import subprocess

    names = [n for n in all_modules() if not n.endswith("__main__")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", ALONE, *names], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("FAILED:")]
    assert line.split()[1:] == [], proc.stderr[-3000:]
