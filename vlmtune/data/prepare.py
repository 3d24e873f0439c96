"""`vlmtune data prepare ROOT`: verify the LLaVA download layout and make every OCR-VQA image a real JPEG.

The layout is XTuner's (docs "LLaVA dataset"), which its LLaVA configs and ours point at:

    ROOT/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json, images/        pretrain data_path, image_folder
    ROOT/LLaVA-Instruct-150K/llava_v1_5_mix665k.json                  finetune data_path
    ROOT/llava_images/{coco/train2017, gqa/images, ocr_vqa/images,   finetune image_folder
                       textvqa/train_images, vg/VG_100K, vg/VG_100K_2}

OCR-VQA's download script saves each cover under the extension of its URL (.gif, .png, ...) while
llava_v1_5_mix665k.json names every one `<id>.jpg`, and some `.jpg` files hold GIF or PNG data. Here every
image gets a `<stem>.jpg` that really is a JPEG: copied when the content is JPEG, re-encoded (RGB, quality
95) otherwise; originals under other names are kept. Each write goes to a temporary file renamed into
place, so an interrupted run leaves no half-written image, and a second run finds nothing to do.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlmtune.data.image import load_image
from vlmtune.data.llava_json import RecordError
from vlmtune.errors import UserError

LAYOUT = [  # (path under ROOT, a trailing / for a folder; what it is / where it comes from)
    ("LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "pretrain annotations (hf: liuhaotian/LLaVA-Pretrain)"),
    ("LLaVA-Pretrain/images/", "pretrain images (images.zip of liuhaotian/LLaVA-Pretrain)"),
    ("LLaVA-Instruct-150K/llava_v1_5_mix665k.json", "finetune annotations (hf: liuhaotian/LLaVA-Instruct-150K)"),
    ("llava_images/coco/train2017/", "COCO train2017.zip"),
    ("llava_images/gqa/images/", "GQA images.zip"),
    ("llava_images/ocr_vqa/images/", "OCR-VQA covers (by hand: the dataset's loadDataset.py)"),
    ("llava_images/textvqa/train_images/", "TextVQA train_val_images.zip"),
    ("llava_images/vg/VG_100K/", "Visual Genome images.zip (part 1)"),
    ("llava_images/vg/VG_100K_2/", "Visual Genome images2.zip (part 2)"),
]
OCR_VQA = "llava_images/ocr_vqa/images"
JPEG_QUALITY = 95


@dataclass
class Fix:
    """Make `target` a JPEG from `source`: 'copy' (already JPEG data) or 'reencode'."""

    source: Path
    target: Path
    action: str
    fmt: str


@dataclass
class Result:
    """What `prepare` found and did."""

    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, what it is)
    ocr_images: int = 0
    fixes: list[Fix] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def check_layout(root: Path) -> list[tuple[str, str]]:
    """(path, description) of every part of the layout that is missing or an empty folder."""
    missing = []
    for relative, what in LAYOUT:
        path = root / relative
        if relative.endswith("/"):
            present = path.is_dir() and any(os.scandir(path))
        else:
            present = path.is_file() and path.stat().st_size > 0
        if not present:
            missing.append((relative, what))
    return missing


def plan_ocr_vqa(folder: Path) -> tuple[int, list[Fix], list[tuple[Path, str]]]:
    """(images seen, fixes needed, unreadable files) for the OCR-VQA folder; reads headers only."""
    fixes, unreadable, targets, seen = [], [], set(), 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not entry.is_file() or entry.name.startswith("."):
            continue
        seen += 1
        fmt = image_format(path)
        if fmt is None:
            unreadable.append((path, "not an image Pillow can read"))
            continue
        target = path.with_suffix(".jpg")
        if path == target and fmt == "JPEG":
            continue
        if path != target and (target.exists() or target in targets):
            continue  # X.jpg exists (and is checked on its own) or another X.* already makes it
        targets.add(target)
        fixes.append(Fix(path, target, "copy" if fmt == "JPEG" else "reencode", fmt))
    return seen, fixes, unreadable


def image_format(path: Path) -> str | None:
    """Pillow's name for the content's format (JPEG, GIF, PNG, ...), None when it is not an image."""
    try:
        with Image.open(path) as image:
            return image.format
    except Exception:  # any failure to identify the file means the same thing here
        return None


def apply_fix(fix: Fix) -> None:
    """Write fix.target atomically (temporary file in the same folder, then os.replace)."""
    tmp = fix.target.with_name(f".{fix.target.name}.tmp")
    try:
        if fix.action == "copy":
            shutil.copyfile(fix.source, tmp)
        else:
            load_image(fix.source).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, fix.target)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(root: Path, dry_run: bool = False) -> Result:
    """Check the layout; plan (and unless `dry_run`, apply) the OCR-VQA fixes."""
    result = Result(missing=check_layout(root))
    folder = root / OCR_VQA
    if not folder.is_dir():
        return result
    result.ocr_images, fixes, result.unreadable = plan_ocr_vqa(folder)
    if dry_run:
        result.fixes = fixes
        return result
    from tqdm import tqdm

    for fix in tqdm(fixes, desc="OCR-VQA to JPEG", unit="img", disable=None):
        try:
            apply_fix(fix)
            result.fixes.append(fix)
        except RecordError as e:  # the header looked fine but the data does not decode
            result.unreadable.append((fix.source, e.detail))
    return result


def print_result(root: Path, result: Result, dry_run: bool) -> None:
    """What is missing, what was (or would be) fixed, what to do next."""
    for relative, what in LAYOUT:
        status = "MISSING" if (relative, what) in result.missing else "ok"
        print(f"  {status:7} {relative:45} {what}")
    if result.ocr_images:
        verb = "would write" if dry_run else "wrote"
        counts: dict[str, int] = {}
        for fix in result.fixes:
            counts[f"{fix.action} {fix.fmt}"] = counts.get(f"{fix.action} {fix.fmt}", 0) + 1
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to do"
        print(f"OCR-VQA: {result.ocr_images} files; {verb} {len(result.fixes)} JPEGs ({detail})")
        for fix in result.fixes[:5]:
            print(f"  {fix.action:8} {fix.source.name} ({fix.fmt}) -> {fix.target.name}")
    for path, why in result.unreadable[:10]:
        print(f"  UNREADABLE {path}: {why}")
    if len(result.unreadable) > 10:
        print(f"  ... and {len(result.unreadable) - 10} more unreadable files")
    if result.missing:
        print(f"{len(result.missing)} part(s) missing; scripts/download_llava_data.sh {root} fetches all but OCR-VQA")
    print(f"next: vlmtune data check {root}/LLaVA-Instruct-150K/llava_v1_5_mix665k.json --image-folder {root}/llava_images --config <your finetune config>")


def main(args) -> int:
    """`vlmtune data prepare ROOT [--dry-run]`; 0 when the layout is complete and every image readable."""
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give the folder that holds LLaVA-Pretrain/ and llava_images/")
    result = prepare(root, args.dry_run)
    print_result(root, result, args.dry_run)
    return 1 if result.missing or result.unreadable else 0
