"""Real-token fraction with multimodal packing vs padded batches (random order, length-grouped), same data.

    python scripts/bench/bench_packing.py [--records 100000] [--batch-size 16] [--max-length 2048]
                                         [--budgets 4096 8192 16384 32768] [--data MIX.json]

Data: the synthetic LLaVA-665K mix (make_synthetic_mix.py; or --data), tokenized by vlmtune's own path
(build_dataset: vicuna template, the real 32k Llama SentencePiece tokenizer from mistral-common, 576 tokens
per image) into a temporary cache. Every micro-batch layout below is made from those lengths by the samplers
training uses, and a few hundred micro-batches of each are run through the training collate functions
(`collate` / `collate_packed`) to count real and computed tokens after image expansion:

- random / grouped: BatchSampler (group_by_length False / True), --batch-size samples right-padded to the
  longest; memory must be provisioned for batch_size x max_length tokens.
- packed B: PackedBatchSampler with a B-token budget, one sequence per micro-batch (no padding at all);
  fill = tokens / (micro-batches x B), i.e. real tokens per provisioned token.

"real/computed" is real tokens over the tokens the model computes (padding included); "real/provisioned"
divides by the memory budget instead (batch_size x max_length, or B) -- the equal-memory comparison.
"attn useful (dense)" is the share of the query-key pairs an attention with a dense mask (sdpa, eager)
computes that lie within one sample: sum(T_i^2) / (rows x L^2). Varlen flash-attention (and flex) compute
only those, so packing's attention cost depends on the backend; linear layers see real/computed.
Target: >= 0.99 real tokens with packing, at least as good as grouping at equal memory.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from vlmtune.config import DataConfig
from vlmtune.constants import IMAGE_TOKEN_INDEX
from vlmtune.data.collate import collate, collate_packed
from vlmtune.data.dataset import build_dataset
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.sampler import BatchSampler, PackedBatchSampler
from vlmtune.tiny import make_clip

IMAGE_LENGTH = 576


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.platform()} | {os.cpu_count()} CPUs | python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__} | load average {load}")


def real_tokenizer(folder: Path):
    """The Llama-style 32k SentencePiece tokenizer shipped in the mistral-common wheel."""
    import mistral_common
    from transformers import LlamaTokenizer

    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=False)
    tokenizer.pad_token = tokenizer.unk_token  # as vlmtune's load_tokenizer does for a tokenizer without one
    return tokenizer


def make_mix(path: Path, records: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_synthetic_mix

    make_synthetic_mix.main([str(path), "--records", str(records)])


def attention_useful(lengths: np.ndarray, batches: list[list[int]], packed: bool) -> float:
    """sum(T_i^2) / (rows x L^2): in-sample query-key pairs over those a dense-mask attention computes."""
    useful = computed = 0
    for b in batches:
        t = lengths[b].astype(np.float64)
        useful += (t**2).sum()
        computed += t.sum() ** 2 if packed else len(t) * t.max() ** 2
    return useful / computed


def measure(dataset, batches: list[list[int]], packed: bool, pad_id: int) -> tuple[int, int, int]:
    """(real tokens, computed tokens, micro-batches) of `batches` through the training collate, after image
    expansion (the model's splice makes a row as long as its ids plus 575 per image)."""
    real = computed = 0
    for indices in batches:
        samples = []
        for i in indices:
            row = dataset.table[i]
            ids = torch.from_numpy(row["input_ids"].astype(np.int64))
            samples.append({"id": row["id"], "input_ids": ids, "labels": ids, "pixel_values": torch.zeros(0, 3, 1, 1)})
        batch = (collate_packed if packed else collate)(samples, pad_token_id=pad_id)
        widths = torch.where(batch["input_ids"] == IMAGE_TOKEN_INDEX, IMAGE_LENGTH, 1) * batch["attention_mask"]
        row_lengths = widths.sum(1)
        real += int(row_lengths.sum())
        computed += int(row_lengths.max()) * len(row_lengths)
    return real, computed, len(batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="synthetic mix size (665298 = the real mix; "
                        "fractions barely change beyond the packer's 10k-sample pools)")
    parser.add_argument("--data", type=Path, help="a LLaVA JSON to use instead of a fresh synthetic mix")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per padded micro-batch")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--check-batches", type=int, default=300, help="micro-batches per layout run through collate")
    args = parser.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print("machine:", machine())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or tmp / "mix.json"
        if args.data is None:
            make_mix(data, args.records)
        tokenizer = real_tokenizer(tmp)
        cfg = DataConfig(data_path=str(data), image_folder=str(tmp), prompt_template="vicuna", max_length=args.max_length,
                         lazy_tokenize=False)  # packing works on exact lengths, as `pack_to_max_length` does
        start = time.perf_counter()
        dataset, report = build_dataset(cfg, tokenizer, ImagePreprocessor(make_clip()[1], True), IMAGE_LENGTH, tmp / "cache")
        print(f"data: {report.summary()}; tokenized in {time.perf_counter() - start:.0f} s")
        lengths = np.abs(dataset.modality_lengths)
        print(f"sequence length after image expansion: mean {lengths.mean():.0f}, p5 {np.percentile(lengths, 5):.0f}, "
              f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}; text-only {np.mean(dataset.modality_lengths < 0):.1%}")
        rows = []
        for name, group in (("random", False), ("grouped", True)):
            sampler = BatchSampler(dataset.modality_lengths, args.batch_size, group_by_length=group, seed=0)
            batches = [b.tolist() for b in sampler.global_batches()]
            padded = sum(args.batch_size * int(lengths[b].max()) for b in batches)
            rows.append((f"{name} x{args.batch_size}", args.batch_size * args.max_length, len(batches), lengths.sum() / padded,
                         lengths.sum() / (len(batches) * args.batch_size * args.max_length),
                         measure(dataset, batches[: args.check_batches], False, tokenizer.pad_token_id), 0.0,
                         attention_useful(lengths, batches, False)))
        for budget in args.budgets:
            start = time.perf_counter()
            sampler = PackedBatchSampler(dataset.modality_lengths, budget, seed=0)
            seconds = time.perf_counter() - start
            batches = [b[0].tolist() for b in sampler.global_batches()]
            rows.append((f"packed {budget}", budget, len(batches), 1.0, sampler.fill(),
                         measure(dataset, batches[: args.check_batches], True, tokenizer.pad_token_id), seconds,
                         attention_useful(lengths, batches, True)))

    print(f"\n{'layout':16s} {'provisioned':>11s} {'micro-batches':>13s} {'real/computed':>13s} {'(collate check)':>15s} "
          f"{'real/provisioned':>16s} {'tokens/micro-batch':>18s} {'attn useful (dense)':>19s} {'sampler s':>9s}")
    for name, provisioned, n, frac, fill, (real, computed, _), seconds, attn in rows:
        print(f"{name:16s} {provisioned:11d} {n:13d} {frac:13.4f} {real / computed:15.4f} {fill:16.4f} "
              f"{lengths.sum() / n:18.0f} {attn:19.3f} {seconds:9.2f}")
    grouped = rows[1]
    equal = [r for r in rows[2:] if r[1] == grouped[1]]
    if equal:
        print(f"\nat equal memory ({grouped[1]} tokens): packed real/provisioned {equal[0][4]:.4f} vs grouped {grouped[4]:.4f} "
              f"({equal[0][4] / grouped[4]:.2f}x); packed tokens per micro-batch {lengths.sum() / equal[0][2]:.0f} vs "
              f"grouped {lengths.sum() / grouped[2]:.0f}")
    best = max(r[4] for r in rows[2:])
    print(f"packing real/computed = 1.0000 (no padding); best fill {best:.4f} (target >= 0.99: {'met' if best >= 0.99 else 'NOT met'})")
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
