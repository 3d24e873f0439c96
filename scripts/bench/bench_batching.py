"""Real-token fraction and tokens per optimizer step on the 665K mix: random order, length-grouped, packed.

    python scripts/bench/bench_batching.py [--data /tmp/vlmtune_bench/mix665k.json] [--batch-size 16]
        [--world-size 8] [--budgets 2048 4096 8192 16384]

The exact lengths of every record (vicuna template, real 32k Llama tokenizer, 576 tokens per image,
max_length 2048) come from vlmtune's token cache (`build_table`, kept in --cache: a first run builds it, the
next ones read it in about a second; --data is written by make_synthetic_mix.py if missing). On those
lengths, for one epoch of LLaVA-1.5's layout (--world-size ranks x --batch-size samples per micro-batch):

- random: BatchSampler(group_by_length=False): right-padded micro-batches, the baseline;
- grouped: BatchSampler(group_by_length=True): XTuner/LLaVA modality-aware length grouping;
- grouped, estimated: the same sampler fed the lengths lazy tokenization estimates (the text table:
  images and special ids exact, text by tokens per character), measured on the exact lengths;
- first-fit B: offline first-fit of the shuffled lengths into B-token bins (the packing the issue measured
  XTuner's numbers with), computed here;
- packed B: vlmtune's PackedBatchSampler (best-fit decreasing in pools of 10,000, one pack per micro-batch).

Also printed: the share of a grouped micro-batch's positions at which the LM head runs in training (positions
where some sample predicts a target: LlavaModel with `transformers_llm`), over --head-batches sampled batches.

real fraction = real tokens / tokens provisioned: batch_size x longest sample of the micro-batch for padded
batches, the budget B for packs (a pack is one unpadded sequence of at most B tokens). Tokens per optimizer
step = real tokens of all ranks' micro-batches of one step (accumulative_counts 1). Ratios are to random.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def lengths_of(data: str, cache: str):
    """Modality lengths (image samples positive, text-only negative) of every kept record of `data`: exact
    (the token table) and as lazy tokenization estimates them (the text table), row for row; and the token table."""
    import mistral_common
    from transformers import LlamaTokenizer

    from vlmtune.config import DataConfig
    from vlmtune.data.dataset import LlavaDataset, build_table

    if not Path(data).is_file():
        sys.path.insert(0, str(HERE))
        import make_synthetic_mix

        make_synthetic_mix.main([data])
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", Path(folder) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=False)
    cfg = DataConfig(data_path=data, image_folder="", prompt_template="vicuna", max_length=2048, lazy_tokenize=False)
    table, _ = build_table(cfg, tokenizer, 576, cache)
    texts, _ = build_table(dataclasses.replace(cfg, lazy_tokenize=True), tokenizer, 576, cache)
    # the text table also holds the few records tokenizing would drop (nothing left to train on): align by id
    kept_ids = set(table.data.column("id").to_pylist())
    kept = np.array([i in kept_ids for i in texts.data.column("id").to_pylist()])
    estimated = LlavaDataset(texts, "", None).modality_lengths[kept]
    return LlavaDataset(table, "", None).modality_lengths, estimated, table


def padded(lengths: np.ndarray, batches: list[np.ndarray], batch_size: int, world: int) -> dict:
    """Figures of padded micro-batches: global batch g holds world x batch_size indices, rank r takes g[r::world]."""
    L = lengths[np.stack(batches)].reshape(len(batches), batch_size, world)  # [steps, sample, rank]
    real, provisioned = L.sum(axis=1), batch_size * L.max(axis=1)  # [steps, rank]
    return {"fraction": real.sum() / provisioned.sum(), "step_tokens": real.sum(axis=1).mean(),
            "micro_tokens": provisioned.mean(), "micro_max": provisioned.max(), "steps": len(batches)}


def packed(pack_sizes: np.ndarray, budget: int, world: int) -> dict:
    """Figures of packs of `budget` tokens, world of them per optimizer step."""
    return {"fraction": pack_sizes.sum() / (len(pack_sizes) * budget), "step_tokens": pack_sizes.mean() * world,
            "micro_tokens": pack_sizes.mean(), "micro_max": pack_sizes.max(), "steps": -(-len(pack_sizes) // world)}


def first_fit(lengths: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Bin totals of first-fit over the shuffled lengths: each sample into the first bin it fits (a max tree)."""
    size = 1 << int(np.ceil(np.log2(len(lengths) + 1)))
    tree = np.full(2 * size, budget, dtype=np.int64).tolist()  # free space; leaves size.. are bins in order
    used = 0
    for need in lengths[rng.permutation(len(lengths))].tolist():
        node = 1
        while node < size:  # descend to the leftmost bin with room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        used = max(used, node - size + 1)
        tree[node] -= need
        while node > 1:
            node //= 2
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
    return budget - np.array(tree[size : size + used])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/vlmtune_bench/mix665k.json")
    ap.add_argument("--cache", default="/tmp/vlmtune_bench/cache")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--head-batches", type=int, default=300)
    args = ap.parse_args(argv)
    import torch
    import transformers

    from vlmtune.data.sampler import BatchSampler, PackedBatchSampler

    print("command: python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; load average %.2f %.2f %.2f" % os.getloadavg())
    start = time.perf_counter()
    modality, estimated, table = lengths_of(args.data, args.cache)
    lengths = np.abs(modality)
    print(f"{len(lengths):,} samples, mean {lengths.mean():.0f} tokens (min {lengths.min()}, max {lengths.max()}), "
          f"lengths read in {time.perf_counter() - start:.1f} s")
    error = np.abs(estimated) - lengths
    print(f"lazy estimates: same modality {np.mean(np.sign(estimated) == np.sign(modality)):.4f}, mean error "
          f"{error.mean():+.1f} tokens, mean |error| {np.abs(error).mean():.1f} ({np.abs(error).sum() / lengths.sum():.2%} "
          f"of the tokens), 95th percentile |error| {np.percentile(np.abs(error), 95):.0f}")
    rows = {}
    for name, group, by in (("random", False, modality), ("grouped", True, modality), ("grouped, estimated", True, estimated)):
        sampler = BatchSampler(by, args.batch_size, args.world_size, 0, seed=0, group_by_length=group)
        rows[name] = padded(lengths, sampler.global_batches(), args.batch_size, args.world_size)
    for budget in args.budgets:
        rows[f"first-fit {budget}"] = packed(first_fit(lengths, budget, np.random.default_rng(0)), budget, args.world_size)
        sampler = PackedBatchSampler(modality, budget, args.world_size, 0, seed=0)
        rows[f"packed {budget}"] = packed(np.array([lengths[p].sum() for p in sampler.packs]), budget, args.world_size)
    base = rows["random"]
    print(f"\n{'layout':<20}{'real fraction':>14}{'x random':>10}{'tokens/step':>13}{'provisioned/micro-batch':>25}{'max':>8}{'steps':>9}")
    for name, r in rows.items():
        print(f"{name:<20}{r['fraction']:>14.3f}{r['fraction'] / base['fraction']:>10.2f}{r['step_tokens']:>13,.0f}"
              f"{r['micro_tokens']:>25,.0f}{r['micro_max']:>8,}{r['steps']:>9,}")
    grouped = BatchSampler(modality, args.batch_size, args.world_size, 0, seed=0, group_by_length=True).global_batches()
    picks = np.random.default_rng(0).choice(len(grouped), min(args.head_batches, len(grouped)), replace=False)
    kept = np.array([head_rows(table, grouped[g][:: args.world_size]) for g in picks])
    print(f"\nLM head rows per grouped micro-batch ({len(picks)} sampled): mean {kept.mean():.3f} of the positions, "
          f"median {np.median(kept):.3f}, 95th percentile {np.percentile(kept, 95):.3f}, max {kept.max():.3f}")
    print("load average %.2f %.2f %.2f" % os.getloadavg())
    return 0


def head_rows(table, batch: np.ndarray) -> float:
    """Share of the micro-batch's positions (images expanded, padded to the longest) at which some sample
    predicts a target: where LlavaModel runs the LM head (`transformers_llm`)."""
    from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    rows = table.with_format("numpy", columns=["input_ids", "labels"])
    masks = []
    for i in batch.tolist():
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        expanded = np.repeat(labels != IGNORE_INDEX, np.where(ids == IMAGE_TOKEN_INDEX, 576, 1))
        masks.append(expanded[1:])  # position t predicts label t + 1
    union = np.zeros(max(map(len, masks)), dtype=bool)
    for mask in masks:
        union[: len(mask)] |= mask
    return float(union.mean())


if __name__ == "__main__":
    sys.exit(main())
