"""`vlmtune data prepare`: the LLaVA layout check and the OCR-VQA to-JPEG fix (dry run, atomic, idempotent),
plus the download script's shell syntax."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from bad_corpus import photo
from PIL import Image

from vlmtune.cli import main as cli
from vlmtune.data.prepare import LAYOUT, OCR_VQA

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "download_llava_data.sh"


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (hidden ones included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def make_root(root: Path, skip: tuple[str, ...] = ()) -> dict[str, Image.Image]:
    """The LLaVA layout with one file per folder, minus `skip`; OCR-VQA covers in mixed formats.
    Returns the source image of each OCR-VQA stem."""
    for relative, _ in LAYOUT:
        if relative in skip:
            continue
        path = root / relative
        if relative.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            if relative != OCR_VQA + "/":
                photo("rocket", 64).save(path / "0001.jpg")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("[]")
    covers = {name: photo(name, 96) for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")}
    ocr = root / OCR_VQA
    covers["astronaut"].save(ocr / "astronaut.jpg")  # fine already
    covers["coffee"].save(ocr / "coffee.jpg", format="GIF")  # GIF data named .jpg
    covers["chelsea"].save(ocr / "chelsea.gif")  # saved under its URL's extension
    covers["rocket"].save(ocr / "rocket.png")
    covers["camera"].save(ocr / "camera.jpeg")  # JPEG data, other extension: copied
    (ocr / "broken.jpg").write_bytes(b"not an image at all")
    return covers


def test_dry_run_changes_nothing_then_the_fix_makes_real_jpegs_once(tmp_path, capsys):
    covers = make_root(tmp_path)
    before = tree(tmp_path)
    assert cli(["data", "prepare", str(tmp_path), "--dry-run"]) == 1  # broken.jpg is unreadable
    out = capsys.readouterr().out
    assert tree(tmp_path) == before
    assert "would write 4 JPEGs (copy JPEG: 1, reencode GIF: 2, reencode PNG: 1)" in out and "UNREADABLE" in out

    assert cli(["data", "prepare", str(tmp_path)]) == 1
    ocr = tmp_path / OCR_VQA
    for stem, source in covers.items():
        with Image.open(ocr / f"{stem}.jpg") as image:
            assert image.format == "JPEG" and image.mode in ("RGB", "L")
            diff = np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - np.asarray(source.convert("RGB"), dtype=np.int16))
        assert diff.mean() < 12, stem  # the same picture (GIF palettes and JPEG loss aside)
    assert (ocr / "chelsea.gif").is_file() and (ocr / "rocket.png").is_file()  # originals kept
    assert (ocr / "camera.jpg").read_bytes() == (ocr / "camera.jpeg").read_bytes()
    assert (ocr / "astronaut.jpg").stat().st_size and not list(ocr.glob(".*"))

    fixed = tree(tmp_path)
    assert cli(["data", "prepare", str(tmp_path)]) == 1
    assert "wrote 0 JPEGs (nothing to do)" in capsys.readouterr().out
    assert tree(tmp_path) == fixed


def test_missing_parts_are_listed_and_a_complete_layout_passes(tmp_path, capsys):
    make_root(tmp_path, skip=("llava_images/vg/VG_100K_2/", "LLaVA-Instruct-150K/llava_v1_5_mix665k.json"))
    (tmp_path / "llava_images/gqa/images/0001.jpg").unlink()  # an empty folder counts as missing
    (tmp_path / OCR_VQA / "broken.jpg").unlink()
    assert cli(["data", "prepare", str(tmp_path), "--dry-run"]) == 1
    missing = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("MISSING")]
    assert missing == ["LLaVA-Instruct-150K/llava_v1_5_mix665k.json", "llava_images/gqa/images/", "llava_images/vg/VG_100K_2/"]

    complete = tmp_path / "complete"
    make_root(complete)
    (complete / OCR_VQA / "broken.jpg").unlink()
    assert cli(["data", "prepare", str(complete)]) == 0
    assert "MISSING" not in capsys.readouterr().out


def test_not_a_folder_is_a_user_error(tmp_path, capsys):
    assert cli(["data", "prepare", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_download_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert "set -euo pipefail" in SCRIPT.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (optional: apt-get install shellcheck)")
def test_download_script_passes_shellcheck():
    subprocess.run(["shellcheck", str(SCRIPT)], check=True)


STUB = """#!{python}
# offline stand-in for {name}: logs its arguments, makes the files the real tool would
import sys, zipfile
from pathlib import Path
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write("{name} " + " ".join(args) + "\\n")
def zip_with(path, folder):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(folder + "/0001.jpg", b"jpeg bytes")
if "{name}" == "wget":
    url, out = args[-1], args[args.index("-O") + 1]
    top = {{"train2017.zip": "train2017", "images2.zip": "VG_100K_2", "train_val_images.zip": "train_images"}}
    name = url.rsplit("/", 1)[1]
    zip_with(out, top.get(name, "VG_100K" if "VG_100K_2" in url else "images"))
elif "{name}" == "git" and args[0] == "clone":
    (Path(args[2]) / ".git").mkdir(parents=True)
elif "{name}" == "git" and "lfs" in args:
    folder = Path(args[1])
    for file in args[args.index("--include") + 1].split(","):
        if file.endswith(".zip"):
            zip_with(folder / file, "00000")
        else:
            (folder / file).write_text("[]")
"""


def test_download_script_fills_the_layout_and_a_second_run_only_skips(tmp_path):
    """The script with offline stand-ins for git, git-lfs and wget (unzip is real)."""
    import sys

    bin_dir, log, root = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "llava"
    bin_dir.mkdir()
    for name in ("git", "git-lfs", "wget"):
        (bin_dir / name).write_text(STUB.format(python=sys.executable, name=name, log=str(log)))
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    first = subprocess.run(["bash", str(SCRIPT), str(root)], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "OCR-VQA" in first.stdout and "vlmtune data prepare" in first.stdout
    from vlmtune.data.prepare import check_layout

    assert [path for path, _ in check_layout(root)] == [OCR_VQA + "/"]  # only the by-hand part is missing
    assert not list((root / ".download").glob("*.zip"))  # archives removed after unpacking
    calls = log.read_text().splitlines()
    assert sum(c.startswith("wget") for c in calls) == 5 and sum("clone" in c for c in calls) == 2

    second = subprocess.run(["bash", str(SCRIPT), str(root)], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert log.read_text().splitlines() == calls  # nothing fetched again
    assert second.stdout.count("skip ") == 7
