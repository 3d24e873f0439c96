"""Static scan of vlmtune/ and scripts/: no route that deserialises or executes a file's content, except the
allow-listed uses below (each with its file, its line and why it is safe).

Routes: torch.load (under any import name, also torch.serialization.load and torch.jit.load) without a literal
`weights_only=True`; pickle / cPickle / _pickle / dill / joblib / marshal / shelve loaders; numpy.load with
`allow_pickle=True`; pandas.read_pickle; yaml.load / yaml.unsafe_load; mmengine Config.fromstring / fromfile;
the builtins eval / exec / compile / __import__; and `trust_remote_code=True` written as a literal. A route
is caught when it is called, and also when it is only referenced (`f = torch.load`, `getattr(torch, "load")`),
since a reference can be called later by code the scan does not follow.

The resolver follows each file's imports (`import torch as T`, `from torch import load as tl`,
`from torch import serialization`), so a renamed import does not hide a call. `test_the_scanner_finds_*`
feeds it hostile snippets, so an empty result means something.
"""
from __future__ import annotations

import ast
import builtins
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("vlmtune", "scripts")

# Fully qualified names that deserialise or execute. torch.load is allowed only as a direct call with
# weights_only=True, numpy.load only without allow_pickle=True (see _verdict).
DANGEROUS = {
    "torch.load", "torch.serialization.load", "torch.jit.load",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "dill.Unpickler", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "numpy.load", "pandas.read_pickle",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
    "mmengine.config.Config.fromstring", "mmengine.config.Config.fromfile",
    "mmengine.Config.fromstring", "mmengine.Config.fromfile",
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__",
}
# The modules whose attributes `getattr(module, "name")` could fetch a dangerous function from.
DANGEROUS_MODULES = {name.rsplit(".", 1)[0] for name in DANGEROUS}

# (file, the stripped source line, why it is safe). Every entry must still match something (no stale entries).
ALLOWED = [
    ("vlmtune/config.py", "raw = MMConfig.fromfile(str(path))",
     "load_config: the config file the user runs on purpose (`vlmtune train my_cfg.py`) is Python, as in XTuner; "
     "configs stored in checkpoints and converted folders are read as literals by config_from_text"),
]


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the fully qualified name it was imported as."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(node: ast.AST, aliases: dict[str, str], shadowed: set[str]) -> str | None:
    """The dotted name an expression refers to (`T.serialization.load` -> torch.serialization.load)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id in aliases:
        base = aliases[node.id]
    elif node.id in vars(builtins) and node.id not in shadowed:
        base = f"builtins.{node.id}"
    else:
        return None
    return ".".join([base, *reversed(parts)])


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _verdict(name: str, call: ast.Call | None) -> str | None:
    """Why this use of `name` is unsafe, or None."""
    if name in ("torch.load", "torch.serialization.load"):
        if call is not None and _keyword_is(call, "weights_only", True):
            return None
        return f"{name} without weights_only=True"
    if name == "numpy.load":
        if call is not None and not any(k.arg == "allow_pickle" for k in call.keywords):
            return None  # numpy's default allow_pickle=False
        return "numpy.load with allow_pickle (or referenced)"
    return name if name in DANGEROUS else None


def scan_source(text: str, filename: str) -> list[tuple[int, str]]:
    """(line, what) of each unsafe route in one file's source."""
    tree = ast.parse(text, filename=filename)
    aliases = _aliases(tree)
    shadowed = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    shadowed |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    found, called = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called.add(id(node.func))
            name = _qualified(node.func, aliases, shadowed)
            if name and (why := _verdict(name, node)):
                found.append((node.lineno, why))
            if name == "builtins.getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                module = _qualified(node.args[0], aliases, shadowed)
                if module in DANGEROUS_MODULES and f"{module}.{node.args[1].value}" in DANGEROUS:
                    found.append((node.lineno, f"getattr({module}, {node.args[1].value!r})"))
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True:
                    found.append((node.lineno, "trust_remote_code=True"))
    for node in ast.walk(tree):  # references that are not the function of a call
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in called and isinstance(node.ctx, ast.Load):
            name = _qualified(node, aliases, shadowed)
            if name in DANGEROUS and not name.startswith("builtins."):
                found.append((node.lineno, f"reference to {name}"))
            elif name in ("builtins.eval", "builtins.exec", "builtins.compile"):
                found.append((node.lineno, f"reference to {name}"))
    return sorted(set(found))


def _files():
    for folder in SCANNED:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_nothing_in_the_package_or_scripts_deserialises_or_executes_outside_the_allow_list():
    allowed = {(file, line): reason for file, line, reason in ALLOWED}
    used, unsafe, files = set(), [], 0
    for path in _files():
        files += 1
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for lineno, what in scan_source(text, rel):
            key = (rel, lines[lineno - 1].strip())
            if key in allowed:
                used.add(key)
            else:
                unsafe.append(f"{rel}:{lineno}: {what}: {lines[lineno - 1].strip()}")
    assert files > 50, "the scan must see the package and the scripts"
    assert unsafe == []
    assert used == set(allowed), f"stale allow-list entries: {set(allowed) - used}"


# ---- the scanner itself finds what it claims to find

def _found(snippet: str) -> list[str]:
    return [what for _, what in scan_source(snippet, "snippet.py")]


def test_the_scanner_finds_torch_load_under_any_name():
    assert _found("import torch\ntorch.load(p)\n") == ["torch.load without weights_only=True"]
    assert _found("import torch as T\nT.load(p, weights_only=False)\n") == ["torch.load without weights_only=True"]
    assert _found("from torch import load as tl\ntl(p)\n") == ["torch.load without weights_only=True"]
    assert _found("from torch import serialization\nserialization.load(p)\n") == ["torch.serialization.load without weights_only=True"]
    assert _found("import torch\ntorch.serialization.load(p)\n") == ["torch.serialization.load without weights_only=True"]
    assert _found("import torch\nf = torch.load\n") == ["reference to torch.load"]
    assert _found("import torch\ngetattr(torch, 'load')(p)\n") == ["getattr(torch, 'load')"]
    assert _found("import torch\ntorch.jit.load(p)\n") == ["torch.jit.load"]
    assert _found("import torch\ntorch.load(p, weights_only=True)\n") == []


def test_the_scanner_finds_pickle_numpy_pandas_yaml_mmengine_and_builtins():
    assert _found("import pickle\npickle.loads(b)\n") == ["pickle.loads"]
    assert _found("from pickle import Unpickler\nUnpickler(f).load()\n") == ["pickle.Unpickler"]
    assert _found("import dill\ndill.load(f)\n") == ["dill.load"]
    assert _found("import numpy as np\nnp.load(p, allow_pickle=True)\n") == ["numpy.load with allow_pickle (or referenced)"]
    assert _found("import numpy as np\nnp.load(p)\n") == []
    assert _found("import pandas as pd\npd.read_pickle(p)\n") == ["pandas.read_pickle"]
    assert _found("import yaml\nyaml.load(s)\n") == ["yaml.load"]
    assert _found("from mmengine.config import Config as C\nC.fromstring(t, '.py')\n") == ["mmengine.config.Config.fromstring"]
    assert _found("from mmengine import Config\nConfig.fromfile(p)\n") == ["mmengine.Config.fromfile"]
    assert _found("eval(s)\n") == ["builtins.eval"]
    assert _found("exec(s)\n") == ["builtins.exec"]
    assert _found("model.eval()\n") == []  # a method called eval is not the builtin
    assert _found("f(trust_remote_code=True)\n") == ["trust_remote_code=True"]
    assert _found("f(trust_remote_code=flag)\n") == []
    assert _found("import pickle\nexcept_ = pickle.UnpicklingError\n") == []  # the exception class is harmless
