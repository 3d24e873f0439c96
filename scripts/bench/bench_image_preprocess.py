"""Image preprocessing speed and accuracy: ImagePreprocessor "fast" vs "hf" (transformers' CLIPImageProcessor).

    python scripts/bench/bench_image_preprocess.py [--files 48] [--repeats 5] [--no-pad]

Writes `--files` COCO-sized JPEGs (640x480, 640x427, 480x640, 500x375, 612x612, 640x360; quality 90) made
from scikit-image's sample photos into a temporary folder, then, in one process on one thread, times
file -> tensor [3, 336, 336] for each method: `load_image` (decode + RGB) + ImagePreprocessor (LLaVA's
pad-to-square with the CLIP mean colour, then resize 336 + centre crop + rescale + normalise) with the tiny
CLIP's processor (the CLIP-L/336 settings). The methods alternate over `--repeats` passes of all files; the
fastest pass of each counts. Prints images/s per core, the ratio (target >= 2x), decode-only speed, and the
mean / max abs difference of the normalised tensors vs "hf", with bf16 rounding of the "hf" tensors (what a
bf16 run feeds CLIP) as the yardstick.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import PIL
import torch
import transformers
from PIL import Image
from skimage import data as skdata

from vlmtune.data.image import ImagePreprocessor, load_image
from vlmtune.tiny import make_clip

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "camera")
SIZES = ((640, 480), (640, 427), (480, 640), (500, 375), (612, 612), (640, 360))


def machine() -> str:
    """One line: platform, CPUs, versions, load average."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.platform()} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"pillow {PIL.__version__} | load average {load}")


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """n JPEGs of COCO sizes cut from the sample photos (photo k % 8, size k % 6)."""
    paths = []
    for k in range(n):
        photo = Image.fromarray(getattr(skdata, PHOTOS[k % len(PHOTOS)])()).convert("RGB")
        path = folder / f"{k:03d}.jpg"
        photo.resize(SIZES[k % len(SIZES)], Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def one_pass(paths: list[Path], fn) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-pad", action="store_true", help="no pad-to-square (resize shortest edge + centre crop)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print("machine:", machine())

    _, processor = make_clip()
    methods = {m: ImagePreprocessor(processor, pad_to_square=not args.no_pad, method=m) for m in ("hf", "fast")}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.files)
        sizes = sorted({Image.open(p).size for p in paths})
        print(f"{len(paths)} JPEGs, sizes {sizes}, pad_to_square={not args.no_pad}, output 3x336x336")
        runs = {"decode only": lambda p: load_image(p), **{m: (lambda p, pre=pre: pre(load_image(p))) for m, pre in methods.items()}}
        for fn in runs.values():  # warm-up: page cache, lazy imports
            one_pass(paths[:4], fn)
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                best[name] = min(best[name], one_pass(paths, fn))
        tensors = {m: torch.stack([pre(load_image(p)) for p in paths]) for m, pre in methods.items()}

    for name, seconds in best.items():
        print(f"{name:12s} {len(paths) / seconds:8.1f} images/s per core  ({seconds / len(paths) * 1e3:6.2f} ms/image)")
    ratio = best["hf"] / best["fast"]
    print(f"ratio fast / hf = {ratio:.2f}x  (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    ref, fast = tensors["hf"], tensors["fast"]
    diff = (fast - ref).abs()
    bf16 = (ref.bfloat16().float() - ref).abs()
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    levels = (diff * std * 255).round()
    print(f"|fast - hf|: mean {diff.mean():.2e}, max {diff.max():.4f} (= {int(levels.max())} of 255 levels), "
          f"values differing: {(diff > 1e-4).float().mean():.3%}")
    print(f"yardstick |bf16(hf) - hf|: mean {bf16.mean():.2e}, max {bf16.max():.4f}")
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
