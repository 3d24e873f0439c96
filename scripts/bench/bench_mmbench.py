"""MMBench generation throughput: batched vs one row at a time, on the tiny CPU models.

    python scripts/bench/bench_mmbench.py [--questions 16] [--batch-size 16] [--max-new-tokens 5] [--threads N]

Builds the tiny models and a circular dev TSV of real JPEGs (4 rotations per question) in a temporary folder,
then answers it with batch size 1 and with --batch-size over the same rows in this process, in --repeats
rounds whose order alternates; a ratio is the median of the per-round ratios, with its spread. A run is run_mmbench's two stages in one process:
`predict` (generation: every row answered and logged), then `finish_run` (scoring, result sheet, report, chart:
a fixed cost of 0.1 to 0.2 s per run that batching does not touch); both are timed. It checks every run gives
identical predictions and prints rows/s (wall) and rows per CPU-second (steadier on a shared machine) with the
ratios. Exits 1 if the predictions differ.

Where the speedup comes from: batch size 1 is the plain path, one ~700-token prefill (576 image tokens), one
image preprocessing and one CLIP pass per row. In a batch, `predict` keeps a question's circular rotations
together and `Generator.generate_shared` decodes, preprocesses and encodes their image once and prefills their
shared prompt prefix (template, image, hint, question) once; only each row's options and answer instruction
(~70 tokens) run per row, then decoding runs batched over all rows. With 4 rotations per question that cuts
the prefill and the image work about 4x; the per-row suffix pass and the decode steps remain.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import transformers
from _common import ratios, spread
from PIL import Image
from skimage import data as skdata

from vlmtune.config import ModelConfig
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.eval.mmbench import mmbench_items
from vlmtune.eval.mmbench_data import load_mmbench
from vlmtune.eval.results import finish_run
from vlmtune.eval.runner import PredictionStore, gather_predictions, predict
from vlmtune.inference import Generator
from vlmtune.model.build import build_model, load_tokenizer
from vlmtune.model.vision import load_image_processor
from vlmtune.tiny import make_tiny

PICTURES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "horse", "page")


def jpeg_b64(name: str, k: int) -> str:
    """A skimage sample picture, resized to a per-question aspect ratio, as base64 JPEG."""
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((200 + 40 * (k % 5), 160 + 30 * (k % 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, questions: int) -> Path:
    """`questions` 4-option questions x 4 rotations; prompts of varied length (hints on some)."""
    rows = []
    for k in range(questions):
        options = [f"option {k}", "a red cup", "two dogs on a long sandy beach", "blue"]
        for r in range(4):
            rotated = options[r:] + options[:r]
            rows.append(dict(
                index=k + r * 1_000_000, question=f"Question {k}: what is shown" + " here" * (k % 6) + "?",
                hint="Look closely at the picture." * (k % 3) or None, **dict(zip("ABCD", rotated)),
                answer="ABCD"[rotated.index(options[0])], category="image_scene", split="dev",
                image=jpeg_b64(PICTURES[k % len(PICTURES)], k) if r == 0 else str(k),
                **{"l2-category": "coarse_perception"},
            ))
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def timed_run(generator, data, run_dir: Path, batch_size: int, max_new_tokens: int) -> tuple[dict, dict]:
    """({"generation" | "end to end": (wall s, CPU s of this process)}, predictions) of one run into a fresh folder:
    run_mmbench's stages in one process, predict then finish_run, timed apart."""
    run_dir.mkdir(parents=True)
    wall, cpu = time.perf_counter(), time.process_time()
    with PredictionStore(run_dir / "predictions.jsonl") as store:
        predict(generator, mmbench_items(generator, data.questions, max_new_tokens), store, batch_size, progress=False)
    generation = (time.perf_counter() - wall, time.process_time() - cpu)
    predictions = gather_predictions(run_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # the score table of a random model is noise here
        finish_run(data, predictions, "vlmevalkit", run_dir)
    return {"generation": generation, "end to end": (time.perf_counter() - wall, time.process_time() - cpu)}, predictions


def report(times: dict[int, list[dict]], rows: int, batch_size: int) -> None:
    """Median rows/s per mode and the median of per-round speedups, for generation alone and end to end."""
    for stage in ("generation", "end to end"):
        print(stage + (" (predict)" if stage == "generation" else " (predict + finish_run)"))
        for mode, runs in times.items():
            wall, cpu = statistics.median(t[stage][0] for t in runs), statistics.median(t[stage][1] for t in runs)
            name = "one at a time" if mode == 1 else f"batch size {mode}"
            print(f"  {name:<14}: {rows / wall:7.1f} rows/s wall ({wall:.2f} s), {rows / cpu:7.1f} rows per CPU-second")
        for i, clock_name in ((0, "wall"), (1, "CPU time")):
            one, batched = [t[stage][i] for t in times[1]], [t[stage][i] for t in times[batch_size]]
            print(f"  speedup batched / one at a time, {clock_name}: {spread(ratios(one, batched), '.2f')}")


def load_average() -> str:
    """1, 5 and 15 minute load averages: the machine may be shared, and wall times stretch with its load."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16, help="questions (x4 rotations = rows)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each running both modes")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; load average {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny(root / "tiny")
        torch.manual_seed(0)
        model = build_model(ModelConfig(str(tiny.llm), str(tiny.clip), torch_dtype="float32"), for_training=False)
        preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
        generator = Generator(model.eval(), load_tokenizer(str(tiny.llm)), get_template("vicuna"), preprocess, 576)
        data = load_mmbench(write_tsv(root / "MMBench_DEV_EN.tsv", args.questions))
        warm = load_mmbench(write_tsv(root / "warm.tsv", 2))
        timed_run(generator, warm, root / "warm", 4, args.max_new_tokens)  # first-call costs out of the timing
        modes = (1, args.batch_size)
        times: dict[int, list[dict]] = {m: [] for m in modes}
        outputs: list[dict[int, str]] = []
        for k in range(args.repeats):
            for batch_size in modes[k % 2:] + modes[:k % 2]:  # interleaved, the order alternating per round
                run, predictions = timed_run(generator, data, root / f"{k}_bs{batch_size}", batch_size,
                                             args.max_new_tokens)
                times[batch_size].append(run)
                outputs.append(predictions)
    print(f"\nrows: {len(data.questions)}, max_new_tokens: {args.max_new_tokens}, {args.repeats} rounds")
    report(times, len(data.questions), args.batch_size)
    same = all(p == outputs[0] for p in outputs)
    print("predictions identical:", same)
    print("load average after:", load_average())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
