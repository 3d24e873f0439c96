"""`list-cfg`, `copy-cfg` and `make-tiny`: small commands around the shipped configs."""
from __future__ import annotations

import shutil
from pathlib import Path

from vlmtune.config import list_configs, resolve_config_path
from vlmtune.errors import UserError


def list_cfg(args) -> int:
    """Print shipped config names (those containing --pattern)."""
    names = list_configs(args.pattern)
    print("\n".join(names) if names else f"no shipped config matches {args.pattern!r}")
    return 0


def copy_cfg(args) -> int:
    """Copy a shipped config into `save_dir` as <name>_copy.py (XTuner's naming) to edit and train."""
    source = resolve_config_path(args.config_name)
    dest_dir = Path(args.save_dir)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise UserError(f"{dest_dir} exists and is not a folder")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{source.stem}_copy.py"
    shutil.copyfile(source, dest)
    print(f"copied {source.name} to {dest}")
    return 0


def make_tiny(args) -> int:
    """Build the tiny offline models and example data that the tiny_* configs use."""
    from vlmtune.tiny import make_tiny as build

    paths = build(args.root, arch=args.arch)
    print(f"tiny LLM: {paths.llm}\ntiny CLIP: {paths.clip}\nexample data: {paths.data}")
    return 0
