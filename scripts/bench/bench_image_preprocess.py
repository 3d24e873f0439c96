"""Image preprocessing speed and accuracy: ImagePreprocessor "fast" vs transformers' CLIPImageProcessor backends.

    python scripts/bench/bench_image_preprocess.py [--files 48] [--repeats 5] [--no-pad]

Writes `--files` COCO-sized JPEGs (640x480, 640x427, 480x640, 500x375, 612x612, 640x360; quality 90) made
from scikit-image's sample photos into a temporary folder, then, in one process on one thread, times
file -> tensor [3, 336, 336]: `load_image` (decode + RGB) + ImagePreprocessor (LLaVA's pad-to-square with
the CLIP mean colour, then resize 336 + centre crop + rescale + normalise) with the CLIP-L/336 settings.

Methods, all built from the same processor settings and timed in the same interleaved rounds (one pass over
all files per method per round, the order rotated each round: scripts/bench/_common.py):
- hf: CLIPImageProcessor's PIL backend (CLIPImageProcessorPil), what transformers 5 uses without torchvision
  and what `image_preprocess='hf'` runs here; the baseline;
- fast: `image_preprocess='fast'` (FastClipTransform), a re-implementation of transformers' torchvision
  backend;
- torchvision: transformers' own torchvision-backed CLIPImageProcessor, when `import torchvision` works
  (otherwise one line says why it was not timed);
- decode only: `load_image`, for scale.
Prints per method the median images/s per core over rounds; the ratios fast/hf (target >= 2x) and
fast/torchvision as the median of the per-round ratios with min-max and IQR; and the accuracy of fast (and
torchvision) against hf in 255 levels, with bf16 rounding of the hf tensors (what a bf16 run feeds CLIP) as
the yardstick.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import clock, footer, header, interleave, ratios, spread
from PIL import Image
from skimage import data as skdata
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmtune.data.image import ImagePreprocessor, load_image
from vlmtune.tiny import make_clip

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "camera")
SIZES = ((640, 480), (640, 427), (480, 640), (500, 375), (612, 612), (640, 360))
BASELINE = "hf = CLIPImageProcessor's PIL backend (CLIPImageProcessorPil), what transformers 5 uses without torchvision"


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """n JPEGs of COCO sizes cut from the sample photos (photo k % 8, size k % 6)."""
    paths = []
    for k in range(n):
        photo = Image.fromarray(getattr(skdata, PHOTOS[k % len(PHOTOS)])()).convert("RGB")
        path = folder / f"{k:03d}.jpg"
        photo.resize(SIZES[k % len(SIZES)], Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def torchvision_processor(settings: dict):
    """transformers' torchvision-backed CLIPImageProcessor with `settings`, or the reason it cannot run.

    Asked for by its module: `transformers.CLIPImageProcessor` silently becomes the PIL backend without
    torchvision, which would time the baseline twice under two names."""
    try:
        import torchvision  # noqa: F401  (the backend's dependency; its absence is the usual reason)
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    return CLIPImageProcessor.from_dict(settings), ""


def build_methods(pad: bool) -> tuple[dict, str, object]:
    """{name: ImagePreprocessor} for hf, fast and (when it imports) torchvision; the torchvision failure text;
    the hf processor (its std converts differences to 255 levels)."""
    settings = make_clip()[1].to_dict()  # the tiny CLIP's processor: CLIP-L/336's settings
    hf = CLIPImageProcessorPil.from_dict(settings)
    methods = {"hf": ImagePreprocessor(hf, pad, method="hf"), "fast": ImagePreprocessor(hf, pad, method="fast")}
    tv, why = torchvision_processor(settings)
    if tv is not None:
        methods["torchvision"] = ImagePreprocessor(tv, pad, method="hf")  # "hf": call the processor itself
    return methods, why, hf


def accuracy(tensors: dict[str, torch.Tensor], std: torch.Tensor) -> None:
    """|method - hf| of the normalised tensors, in values and in 8-bit levels, with bf16 rounding as yardstick."""
    ref = tensors["hf"]
    for name in (m for m in tensors if m != "hf"):
        diff = (tensors[name] - ref).abs()
        levels = (diff * std.view(1, 3, 1, 1) * 255).round()
        print(f"|{name} - hf|: mean {diff.mean():.2e}, max {diff.max():.4f} (= {int(levels.max())} of 255 levels), "
              f"values differing: {(diff > 1e-4).float().mean():.3%}")
    bf16 = (ref.bfloat16().float() - ref).abs()
    print(f"yardstick |bf16(hf) - hf|: mean {bf16.mean():.2e}, max {bf16.max():.4f}")


def report(times: dict[str, list[float]], n: int) -> None:
    """Median images/s per core of each method, then the per-round ratios against hf and torchvision."""
    for name, seconds in times.items():
        per_s = [n / s for s in seconds]
        print(f"{name:12s} {statistics.median(per_s):8.1f} images/s per core (median of rounds; "
              f"{statistics.median(seconds) / n * 1e3:6.2f} ms/image; rounds {min(per_s):.1f}-{max(per_s):.1f})")
    fast_hf = ratios(times["hf"], times["fast"])  # seconds hf / seconds fast = (images/s fast) / (images/s hf)
    met = "met" if statistics.median(fast_hf) >= 2 else "NOT met"
    print(f"ratio fast / hf (images/s), per round: {spread(fast_hf, '.2f')}  (target >= 2x: {met})")
    if "torchvision" in times:
        print(f"ratio fast / torchvision (images/s), per round: {spread(ratios(times['torchvision'], times['fast']), '.2f')}")
        print(f"ratio torchvision / hf (images/s), per round: {spread(ratios(times['hf'], times['torchvision']), '.2f')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (each: one pass per method)")
    parser.add_argument("--no-pad", action="store_true", help="no pad-to-square (resize shortest edge + centre crop)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    header(("torch", "transformers", "pillow", "torchvision"), f"torch threads {torch.get_num_threads()}")

    methods, why, hf = build_methods(not args.no_pad)
    print(BASELINE if type(hf).__name__ == "CLIPImageProcessorPil" else f"hf = {type(hf).__name__}")
    if why:
        print(f"torchvision: transformers' torchvision-backed CLIPImageProcessor could not be timed: "
              f"`import torchvision` failed ({why})")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.files)
        sizes = sorted({Image.open(p).size for p in paths})
        print(f"{len(paths)} JPEGs, sizes {sizes}, pad_to_square={not args.no_pad}, output 3x336x336, 1 thread")
        runs = {"decode only": lambda p: load_image(p), **{m: (lambda p, pre=pre: pre(load_image(p))) for m, pre in methods.items()}}
        variants = {name: (lambda fn=fn: clock(lambda: [fn(p) for p in paths])) for name, fn in runs.items()}
        times = interleave(variants, args.repeats, warmup=1)  # warm-up round: page cache, lazy imports
        tensors = {m: torch.stack([pre(load_image(p)) for p in paths]) for m, pre in methods.items()}

    report(times, len(paths))
    accuracy(tensors, torch.tensor(hf.image_std))
    footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
