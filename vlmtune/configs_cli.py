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
    """Copy a shipped config into `save_dir` as <name>_copy.py (XTuner's naming) to edit and train.

    The files it inherits from (`_base_`, relative paths) are copied beside it under their own names, so
    the copy loads as it is."""
    source = resolve_config_path(args.config_name)
    dest_dir = Path(args.save_dir)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise UserError(f"{dest_dir} exists and is not a folder")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{source.stem}_copy.py"
    shutil.copyfile(source, dest)
    for base in _base_files(source):
        if not (dest_dir / base.name).exists():
            shutil.copyfile(base, dest_dir / base.name)
            print(f"copied its base {base.name} to {dest_dir / base.name}")
    print(f"copied {source.name} to {dest}")
    return 0


def _base_files(path: Path) -> list[Path]:
    """Every file `path` inherits from through `_base_`, recursively (mmengine's own parser reads them)."""
    from mmengine.config import Config as MMConfig

    bases = MMConfig._get_base_files(str(path))
    files = [(path.parent / b).resolve() for b in bases]
    return [f for b in files for f in (b, *_base_files(b))]


def make_tiny(args) -> int:
    """Build the tiny offline models and example data that the tiny_* configs use."""
    from vlmtune.tiny import make_tiny as build

    paths = build(args.root, arch=args.arch)
    print(f"tiny LLM: {paths.llm}\ntiny CLIP: {paths.clip}\nexample data: {paths.data}")
    return 0
