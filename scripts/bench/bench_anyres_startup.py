"""AnyRes at data startup: what reading every image's size from its header adds to the 665K cold start.

    python scripts/bench/bench_anyres_startup.py [--data /tmp/vlmtune_bench/mix665k.json] [--rounds 3]

Both sides build the default (lazy) table of the synthetic mix665k (scripts/bench/make_synthetic_mix.py) from
an empty cache, each in a fresh process, alternating within every round, with the real 32k Llama tokenizer:
- fixed: every image counts 576 tokens; no image is opened (today's LLaVA-1.5 start);
- anyres: CLIP-L/336 tiles on LLaVA-NeXT's default pinpoints; the build's workers (one per core) read every
  image's (height, width) from its header, store it in the table and count its grid's tokens.
The ratio is the median of the per-round ratios, with its spread (scripts/bench/_common.py).

Images: every image path of the mix is a hard link to a JPEG of one of six COCO/GQA/VG-like sizes, so the grids
differ. The files were just linked and share a few dozen inodes, so the page cache is warm: this measures the
per-file work (path resolution, open, header parse), not a cold disk or a network filesystem's metadata
latency, which can dominate on a cluster (run `vlmtune data check` there to see it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import footer, header, ratios, spread

HERE = Path(__file__).resolve().parent
LINKS_PER_FILE = 30_000
SIZES = ((640, 480), (500, 375), (640, 427), (480, 640), (800, 600), (1024, 683))  # (width, height)


def child(args) -> None:
    """One cold build; prints one JSON line."""
    from vlmtune.config import DataConfig
    from vlmtune.data.dataset import build_table
    from vlmtune.model.anyres import DEFAULT_PINPOINTS, image_layout
    from vlmtune.model.build import load_tokenizer
    from vlmtune.tiny import make_clip

    cfg = DataConfig(data_path=args.data, image_folder=args.images, prompt_template="vicuna", max_length=4096,
                     cache_dir=args.cache, lazy_tokenize=True)
    image_length, anyres = 576, None
    if args.child == "anyres":
        clip_config = make_clip()[0].config  # CLIP-L/336's geometry (336 px, patch 14): only its config is used
        image_length, anyres = image_layout(clip_config, None, DEFAULT_PINPOINTS)
    start = time.perf_counter()
    table, report = build_table(cfg, load_tokenizer(args.tokenizer), image_length, args.cache, anyres)
    seconds = time.perf_counter() - start
    lengths = table.data.column("length").to_numpy()
    print(json.dumps({"seconds": seconds, "records": report.kept, "dropped": report.dropped,
                      "mean_length": float(lengths.mean())}))


def link_images(data: str, folder: Path) -> int:
    """A hard link at every distinct image path of `data` to a JPEG of one of the SIZES in turn (a new copy of
    the JPEG every LINKS_PER_FILE links: filesystems cap an inode's links); the number of paths."""
    from PIL import Image

    from vlmtune.data.reader import read_records

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.linear_gradient("L").convert("RGB").resize(size) for size in SIZES]
    seen, sources = set(), {}
    for record in read_records(data):
        image = record.get("image") if isinstance(record, dict) else None
        if image and image not in seen:
            seen.add(image)
            kind, copy = len(seen) % len(SIZES), len(seen) // (LINKS_PER_FILE * len(SIZES))
            if (kind, copy) not in sources:
                sources[kind, copy] = folder / f"_source_{kind}_{copy}.jpg"
                photos[kind].save(sources[kind, copy], quality=90)
            path = folder / image
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(sources[kind, copy], path)
    return len(seen)


def run(side: str, extra: list[str], cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--cache", str(cache), *extra],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(cache)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/vlmtune_bench/mix665k.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=("fixed", "anyres"))
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    header(("torch", "transformers", "pillow", "pyarrow"))
    sys.path.insert(0, str(HERE))
    from bench_data_startup import prepare

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(argparse.Namespace(data=args.data, ranks=1, num_workers=0), work)
        extra = ["--data", args.data, "--tokenizer", prepared[prepared.index("--tokenizer") + 1],
                 "--images", str(work / "mix_images")]
        t = time.perf_counter()
        paths = link_images(args.data, work / "mix_images")
        print(f"{paths:,} distinct image paths linked in {time.perf_counter() - t:.0f} s", flush=True)
        results = {"fixed": [], "anyres": []}
        for round_ in range(args.rounds):
            for side in ("fixed", "anyres") if round_ % 2 == 0 else ("anyres", "fixed"):
                results[side].append(run(side, extra, work / "cache"))
            print(f"  round {round_ + 1}: fixed {results['fixed'][-1]['seconds']:.1f} s, anyres "
                  f"{results['anyres'][-1]['seconds']:.1f} s", flush=True)
    fixed = [r["seconds"] for r in results["fixed"]]
    anyres = [r["seconds"] for r in results["anyres"]]
    last = results["anyres"][-1]
    print(f"records kept: fixed {results['fixed'][-1]['records']:,}, anyres {last['records']:,} (dropped: {last['dropped']})")
    print(f"mean length: fixed {results['fixed'][-1]['mean_length']:.0f}, anyres {last['mean_length']:.0f} tokens")
    print(f"cold build, median of {args.rounds}: fixed {statistics.median(fixed):.1f} s, anyres "
          f"{statistics.median(anyres):.1f} s (+{statistics.median(anyres) - statistics.median(fixed):.1f} s); "
          f"anyres / fixed {spread(ratios(anyres, fixed), '.2f')}")
    footer()


if __name__ == "__main__":
    main()
