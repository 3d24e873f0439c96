"""`vlmtune eval` generation throughput: batched vs one row at a time, per benchmark kind, on the tiny CPU models.

    python scripts/bench/bench_eval.py [--rows 32] [--batch-size 16] [--vqa-max-new-tokens 16] [--repeats 3] [--threads N]

Writes three TSVs of real JPEGs in a temporary folder, in VLMEvalKit's layouts: ScienceQA_VAL (multiple choice,
one image per row), MME (yes/no, two questions per image, as the real file has) and TextVQA_VAL (VQA, one image
per row), reads them with `vlmtune eval`'s own loader (eval/evaluate.py `load_all`, `items`), then answers each
with batch size 1 and with --batch-size in --repeats rounds whose order alternates, in this process; a ratio is
the median of the per-round ratios, with its spread. New tokens: VLMEvalKit's budget for MCQ and yes/no (5);
VQA's 512 is only reached by a model that never stops, as the random tiny one does not, so it is capped
(--vqa-max-new-tokens). Prints rows/s and the ratios; exits 1 if any run's predictions differ.
"""
from __future__ import annotations

import argparse
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
from bench_mmbench import PICTURES, jpeg_b64, load_average

from vlmtune.config import ModelConfig
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.eval.evaluate import items, load_all
from vlmtune.eval.runner import PredictionStore, gather_predictions, predict
from vlmtune.inference import Generator
from vlmtune.model.build import build_model, load_tokenizer
from vlmtune.model.vision import load_image_processor
from vlmtune.tiny import make_tiny


def write_tsvs(root: Path, rows: int) -> list[Path]:
    """ScienceQA_VAL, MME and TextVQA_VAL with `rows` rows each; prompts of varied length."""
    image = [jpeg_b64(PICTURES[k % len(PICTURES)], k) for k in range(rows)]
    mcq = [dict(index=k, question=f"Question {k}: what is shown" + " here" * (k % 6) + "?", A="a cat", B="a dog",
                C="two birds on a long sandy beach", D="fish", answer="ABCD"[k % 4], category="c", image=image[k])
           for k in range(rows)]
    mme = [dict(index=k, question=f"Is there a {('cat', 'dog')[k % 2]} in picture {k // 2}? Please answer yes or no.",
                answer=("Yes", "No")[k % 2], category="existence", image_path=f"{k // 2}.jpg",
                image=image[k // 2] if k % 2 == 0 else str(k - 1)) for k in range(rows)]
    vqa = [dict(index=k, question=f"What is written on object {k}" + " there" * (k % 4) + "?",
                answer=repr(["red"] * 10), category="c", image=image[k]) for k in range(rows)]
    paths = []
    for name, table in (("ScienceQA_VAL", mcq), ("MME", mme), ("TextVQA_VAL", vqa)):
        paths.append(root / f"{name}.tsv")
        pd.DataFrame(table).to_csv(paths[-1], sep="\t", index=False)
    return paths


def timed(generator, one, run_dir: Path, batch_size: int, max_new_tokens: int) -> tuple[float, dict]:
    """(wall seconds, predictions) of answering every row of one benchmark into a fresh folder."""
    run_dir.mkdir(parents=True)
    todo = items(generator, one, max_new_tokens)
    start = time.perf_counter()
    with PredictionStore(run_dir / "predictions.jsonl") as store:
        predict(generator, todo, store, batch_size, progress=False)
    return time.perf_counter() - start, gather_predictions(run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="rows per benchmark")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vqa-max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each running both modes")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; load {load_average()}")
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny(root / "tiny")
        torch.manual_seed(0)
        model = build_model(ModelConfig(str(tiny.llm), str(tiny.clip), torch_dtype="float32"), for_training=False)
        preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
        generator = Generator(model.eval(), load_tokenizer(str(tiny.llm)), get_template("vicuna"), preprocess, 576)
        for one in load_all([str(p) for p in write_tsvs(root, args.rows)], None):
            budget = args.vqa_max_new_tokens if one.kind.max_new_tokens > 5 else one.kind.max_new_tokens
            timed(generator, one, root / f"warm_{one.stem}", 4, budget)  # first-call costs out of the timing
            modes = (1, args.batch_size)
            times: dict[int, list[float]] = {m: [] for m in modes}
            outputs = []
            for k in range(args.repeats):
                for batch_size in modes[k % 2:] + modes[:k % 2]:  # interleaved, the order alternating per round
                    wall, predictions = timed(generator, one, root / f"{one.stem}_{k}_{batch_size}", batch_size, budget)
                    times[batch_size].append(wall)
                    outputs.append(predictions)
            rows = len(one.prompts)
            one_at_a_time, batched = (statistics.median(times[m]) for m in modes)
            identical = all(p == outputs[0] for p in outputs)
            same &= identical
            print(f"{one.stem} ({one.kind.name}, {rows} rows, {budget} new tokens): one at a time "
                  f"{rows / one_at_a_time:.1f} rows/s, batch size {args.batch_size} {rows / batched:.1f} rows/s, "
                  f"speedup {spread(ratios(times[1], times[args.batch_size]), '.2f')}, identical: {identical}")
    print("load average after:", load_average())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
