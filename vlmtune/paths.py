"""Model arguments that name a local folder: told apart from hub ids, and a missing one said plainly.

`transformers` treats any string it cannot open as a hub id, so a mistyped folder (or the tiny configs run
before `vlmtune make-tiny`) fails with "Repo id must be in the form 'repo_name'..." or a network error, after
DeepSpeed has spent ~30 s building its ops. A name that looks like a path is checked here first.
"""
from __future__ import annotations

import os
from pathlib import Path

from vlmtune.errors import UserError

TINY_DEFAULT = "./work_dirs/tiny"  # where `vlmtune make-tiny` writes and the tiny_* configs look by default


def is_path_like(name: str) -> bool:
    """A folder the user means, not a hub id: starts with ./ ../ / or ~, or its parent folder exists
    (`work_dirs/tiny/llm` with `work_dirs/tiny` present; a hub id `org/model` has no `org/` folder here)."""
    if name.startswith(("./", "../", "/", "~")) or name in (".", ".."):
        return True
    parent = Path(name).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def require_model_folder(name: str, what: str) -> None:
    """A user error when `name` is path-like and no such folder exists; hub ids are left to transformers."""
    if not is_path_like(name) or Path(name).expanduser().is_dir():
        return
    path = Path(name).expanduser()
    if path.is_file():
        raise UserError(f"{what} {name}: is a file; pass the model's folder (the one holding config.json)")
    raise UserError(f"{what} {name}: no such folder{_make_tiny_hint(path)}")


def _make_tiny_hint(path: Path) -> str:
    """'; run `vlmtune make-tiny ROOT` ...' when `path` lies in the tiny models' folder."""
    root = os.environ.get("VLMTUNE_TINY_DIR") or TINY_DEFAULT
    if not path.resolve().is_relative_to(Path(root).resolve()):
        return ""
    return f" (the tiny models are not built yet: run `vlmtune make-tiny {root}` first)"


def check_config_paths(cfg) -> None:
    """Before a run starts (and before torchrun or DeepSpeed): the config's models, data and checkpoint exist,
    and its evaluation_benchmarks files are read and checked (eval's loaders). `cfg` is a vlmtune.config.Config."""
    require_model_folder(cfg.model.llm_name_or_path, "llm_name_or_path")
    require_model_folder(cfg.model.visual_encoder_name_or_path, "visual_encoder_name_or_path")
    checks = [(cfg.data.data_path, "data_path", Path.is_file, "data file"),
              (cfg.data.image_folder, "image_folder", Path.is_dir, "folder")]
    if cfg.train.pretrained_pth:
        checks.append((cfg.train.pretrained_pth, "pretrained_pth", Path.exists, "checkpoint"))
    for value, key, exists, what in checks:
        path = Path(value).expanduser()
        if not exists(path):
            raise UserError(f"{value}: {what} not found; check `{key}` in the config{_make_tiny_hint(path)}")
    if cfg.train.evaluation_benchmarks:  # read and checked: a missing or malformed one is one line now, not at step 500
        from vlmtune.eval.benchmarks import load_benchmarks

        load_benchmarks(cfg)
