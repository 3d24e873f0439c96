"""Data startup on a synthetic mix665k: vlmtune's data steps vs LLaVA's own lazy dataset, cold and warm, and memory.

    python scripts/bench/bench_data_startup.py [--data /tmp/vlmtune_bench/mix665k.json] [--ranks 2]
        [--num-workers 2] [--rounds 3] [--tables lazy tokens] [--baseline-records 20000]

Writes the synthetic mix (scripts/bench/make_synthetic_mix.py) if `--data` does not exist, and the real 32k
Llama tokenizer (the SentencePiece model shipped in mistral-common, as a fast tokenizer.json). Then, in fresh
processes (`--ranks` of them started together, like the ranks of one node), `--rounds` rounds of, per table:
cold vlmtune, LLaVA-lazy, warm vlmtune, LLaVA-lazy. Every ratio is the median of the per-round ratios (each
vlmtune run against the LLaVA-lazy run right after it) with its min-max and IQR (scripts/bench/_common.py).

- vlmtune: what `vlmtune train` runs for its data - load_tokenizer, build_dataset (vicuna, max_length 2048,
  576 tokens per image), BatchSampler (16 per rank, length-grouped), first batch order - timed from the
  tokenizer load. Cold: an empty cache (a new folder each round): one rank builds it with every core, the
  others wait on its lock; warm: the cache is there. The OS page cache is not dropped. Tables: `lazy` (the
  default without packing: texts + estimated lengths, tokenized by the dataloader) and `tokens` (every
  record tokenized up front: what packing uses). Then `--num-workers` dataloader workers load 3 batches of
  real JPEGs (timed);
- LLaVA-lazy, the anchor a user would pick instead: LLaVA's LazySupervisedDataset (haotian-liu/LLaVA
  llava/train/train.py): `json.load` of the whole file in every rank, `modality_lengths` from word counts
  (positive with an image, negative without), then LLaVATrainer's LengthGroupedSampler order
  (group_by_modality_length: LLaVA's functions below, copied), timed from the same tokenizer load;
- memory: RssAnon (anonymous resident memory, /proc/<pid>/status) of each rank after its dataset and first
  batch order, x 8 ranks (a typical node); vlmtune's dataloader workers' RssAnon and Pss_Anon;
- naive, an extra line: json.load + normalize_record + tokenize_conversation record by record in one process,
  on the first `--baseline-records` records, extrapolated (different work from LLaVA-lazy and the lazy table).
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

from _common import child_pids, footer, header, load, ratios, rss, spread

HERE = Path(__file__).resolve().parent
BATCH, LOADED_BATCHES, NODE = 16, 4, 8  # per-rank batch (LLaVA-1.5), batches the dataloader loads, ranks per node
XTUNER = ("XTuner 0.2.0 on the same kind of data, from the issue, not measured here: cold 10.6 min, warm ~40 s, "
          "4.3 GiB RSS")


def rank_main(args) -> None:
    """One rank: the data steps of `vlmtune train`, timed; prints one JSON line."""
    import resource

    t = time.perf_counter()
    import functools

    import pyarrow.compute as pc
    import torch

    from vlmtune.config import DataConfig
    from vlmtune.data.collate import collate
    from vlmtune.data.dataset import build_dataset
    from vlmtune.data.image import ImagePreprocessor
    from vlmtune.data.sampler import BatchSampler
    from vlmtune.model.build import load_tokenizer
    from vlmtune.tiny import make_clip

    imports = time.perf_counter() - t
    cfg = DataConfig(data_path=args.data, image_folder=args.image_folder, prompt_template="vicuna", max_length=2048,
                     pad_image_to_square=True, cache_dir=args.cache, lazy_tokenize=args.table == "lazy")
    preprocess = ImagePreprocessor(make_clip()[1], cfg.pad_image_to_square)  # the CLIP processor, not timed
    before = rss()
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    dataset, report = build_dataset(cfg, tokenizer, preprocess, 576, cfg.cache_dir)
    sampler = BatchSampler(dataset.modality_lengths, BATCH, args.ranks, args.rank, seed=0)
    batches = iter(sampler)
    first = next(batches)
    order_s = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    after = rss()
    loaded = [first] + [next(batches) for _ in range(LOADED_BATCHES - 1)]
    link_images(dataset, loaded, Path(args.image_folder))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=loaded, num_workers=args.num_workers,
                                         collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id))
    t = time.perf_counter()
    fetched = iter(loader)
    tokens = sum(int(next(fetched)["attention_mask"].sum()) for _ in range(LOADED_BATCHES - 1))
    fetch_s = time.perf_counter() - t
    workers = [rss(pid) for pid in child_pids()]
    del fetched
    print(json.dumps({
        "rank": args.rank, "imports_s": imports, "order_s": order_s, "cpu_s": sum(r.ru_utime + r.ru_stime for r in cpu),
        "rss_before": before, "rss_after": after, "workers": workers, "report": report.summary(),
        "records": len(dataset), "mean_length": float(abs(dataset.modality_lengths).mean()), "batch_tokens": tokens,
        "fetch_s": fetch_s, "stored_ids": pc.sum(pc.list_value_length(dataset.table.data.column("input_ids"))).as_py()
        if "input_ids" in dataset.table.column_names else 0,
    }))


def link_images(dataset, batches: list[list[int]], folder: Path) -> None:
    """Hard links to one real photo at every image path of `batches` (the only images the run opens)."""
    photo = folder / "_photo.jpg"
    for index in (i for batch in batches for i in batch):
        for rel in dataset.table[index]["images"]:
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.link(photo, path)


# ---- LLaVA-lazy. LLaVA's sampler functions, copied from haotian-liu/LLaVA at c121f04 (Apache-2.0),
# llava/train/llava_trainer.py lines 38-96 (the code as written; its comments and blank lines left out, the torch
# import moved in); LLaVATrainer._get_train_sampler calls them through
# LengthGroupedSampler(batch_size, world_size * gradient_accumulation_steps, modality_lengths, group_by_modality=True).

def split_to_even_chunks(indices, lengths, num_chunks):
    """LLaVA's: split a list of indices into `chunks` chunks of roughly equal lengths."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def get_modality_length_grouped_indices(lengths, batch_size, world_size, generator=None):
    """LLaVA's: length-grouped megabatches within each modality (sign of the length), shuffled together."""
    import torch

    assert all(l != 0 for l in lengths), "Should not have zero length."
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return get_length_grouped_indices(lengths, batch_size, world_size, generator=generator)
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])
    mm_shuffle = [mm_indices[i] for i in get_length_grouped_indices(mm_lengths, batch_size, world_size, generator=None)]
    lang_shuffle = [lang_indices[i] for i in get_length_grouped_indices(lang_lengths, batch_size, world_size, generator=None)]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i : i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]
    last_mm = mm_megabatches[-1]
    last_lang = lang_megabatches[-1]
    additional_batch = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatch_indices = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in megabatch_indices]
    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))
    return [i for megabatch in megabatches for i in megabatch]


def get_length_grouped_indices(lengths, batch_size, world_size, generator=None, merge=True):
    """LLaVA's: random megabatches of world_size * batch_size, each sorted by length and split evenly."""
    import torch

    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    megabatches = [split_to_even_chunks(megabatch, lengths, world_size) for megabatch in megabatches]
    return [i for megabatch in megabatches for batch in megabatch for i in batch]


def modality_lengths(list_data_dict) -> list[int]:
    """LazySupervisedDataset.modality_lengths (llava/train/train.py lines 683-690): the words of all turns,
    negated for a text-only sample. (`lengths`, +128 per image, is not used by the modality-grouped sampler.)"""
    length_list = []
    for sample in list_data_dict:
        cur_len = sum(len(conv['value'].split()) for conv in sample['conversations'])
        cur_len = cur_len if 'image' in sample else -cur_len
        length_list.append(cur_len)
    return length_list


def llava_main(args) -> None:
    """One rank of LLaVA's train.py up to its first batch order: the tokenizer (vlmtune's loader, so both sides
    load it alike), LazySupervisedDataset's json.load, modality_lengths, the sampler's order; one JSON line."""
    import resource

    t = time.perf_counter()
    import torch

    from vlmtune.model.build import load_tokenizer

    imports = time.perf_counter() - t
    before = rss()
    start = time.perf_counter()
    load_tokenizer(args.tokenizer)
    with open(args.data, "r") as f:  # LazySupervisedDataset.__init__: json.load(open(data_path, "r"))
        list_data_dict = json.load(f)
    json_s = time.perf_counter() - start
    torch.manual_seed(0)  # the Trainer seeds torch; LLaVA's sampler draws from the global generator
    order = get_modality_length_grouped_indices(modality_lengths(list_data_dict), BATCH, args.ranks)
    first = order[args.rank * BATCH : (args.rank + 1) * BATCH]  # accelerate deals rank r every world-th batch
    order_s = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rank": args.rank, "imports_s": imports, "json_s": json_s, "order_s": order_s,
                      "cpu_s": usage.ru_utime + usage.ru_stime, "rss_before": before, "rss_after": rss(),
                      "records": len(list_data_dict), "first_batch": first}))


def naive_main(args) -> None:
    """The naive way, an extra line (it tokenizes every record up front, which neither LLaVA's lazy dataset nor
    the lazy table does): json.load, then normalize + tokenize_conversation record by record on one core; and
    the Rust tokenizer alone, per id (the floor under the tokens table's build)."""
    from vlmtune.data.llava_json import normalize_record
    from vlmtune.data.templates import get_template
    from vlmtune.data.tokenize import (
        encode_texts,
        render_units,
        special_ids,
        tokenize_conversation,
    )
    from vlmtune.model.build import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    with open(args.data, encoding="utf-8") as f:
        records = json.load(f)
    load_s, loaded = time.perf_counter() - start, rss()
    template, n = get_template("vicuna"), min(args.baseline_records, len(records))
    samples = [normalize_record(raw, index) for index, raw in enumerate(records[:n])]
    t = time.perf_counter()
    for sample in samples:
        tokenize_conversation(sample.turns, tokenizer, template, 2048, 576, sample.system)
    per_record = (time.perf_counter() - t) / n
    bos, eos = special_ids(tokenizer)
    texts = [u for s in samples for u, _ in render_units(s.turns, template, s.system, bos, eos) if isinstance(u, str)]
    t = time.process_time()  # this process runs with TOKENIZERS_PARALLELISM=false: one core
    ids = sum(map(len, encode_texts(texts, tokenizer)))
    print(json.dumps({"tokenizer_s_per_id": (time.process_time() - t) / ids, "load_s": load_s, "records": len(records),
                      "measured": n, "rss_after_load": loaded, "per_record_s": per_record,
                      "total_s": load_s + per_record * len(records)}))


def run(mode: str, args, extra: list[str], count: int = 1) -> list[dict]:
    """Start `count` processes of this script in `mode` together; their JSON lines."""
    procs = []
    for rank in range(count):
        cmd = [sys.executable, __file__, "--mode", mode, "--rank", str(rank), *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", RANK=str(rank), WORLD_SIZE=str(count))
        if mode == "naive":
            env["TOKENIZERS_PARALLELISM"] = "false"  # the naive way runs on one core
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{mode} process failed ({p.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def prepare(args, work: Path) -> list[str]:
    """Data, tokenizer and image folder; the arguments the rank processes get."""
    import mistral_common
    from PIL import Image
    from transformers import LlamaTokenizer

    if not Path(args.data).is_file():
        sys.path.insert(0, str(HERE))
        import make_synthetic_mix

        make_synthetic_mix.main([args.data])
    spm = work / "spm"
    spm.mkdir()
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", spm / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(spm), legacy=False).save_pretrained(str(work / "tokenizer"))
    images = work / "images"
    images.mkdir()
    try:
        from skimage import data as skdata

        photo = Image.fromarray(skdata.astronaut()).resize((640, 480))
    except ImportError:
        photo = Image.linear_gradient("L").convert("RGB").resize((640, 480))
    photo.save(images / "_photo.jpg", quality=90)
    return ["--data", str(args.data), "--tokenizer", str(work / "tokenizer"), "--image-folder", str(images),
            "--ranks", str(args.ranks), "--num-workers", str(args.num_workers)]


def one_round(args, extra: list[str], table: str, cache: Path) -> dict:
    """cold vlmtune, LLaVA-lazy, warm vlmtune, LLaVA-lazy; each in fresh processes, `--ranks` started together."""
    ours = [*extra, "--table", table, "--cache", str(cache)]
    out = {}
    for step, mode, argv in (("cold", "rank", ours), ("llava_cold", "llava", extra),
                             ("warm", "rank", ours), ("llava_warm", "llava", extra)):
        out[step] = run(mode, args, argv, args.ranks)
    shutil.rmtree(cache)  # the next round's cold run starts from an empty cache again
    print(f"  {table}: cold {slowest(out['cold']):.2f} s, LLaVA-lazy {slowest(out['llava_cold']):.2f} s, warm "
          f"{slowest(out['warm']):.2f} s, LLaVA-lazy {slowest(out['llava_warm']):.2f} s; {load()}", flush=True)
    return out


def slowest(ranks: list[dict]) -> float:
    """Seconds to the first batch order of the slowest rank (the one training waits for)."""
    return max(r["order_s"] for r in ranks)


def peak(ranks: list[dict]) -> float:
    """The largest rank's RssAnon (MiB) after its dataset and first batch order."""
    return max(r["rss_after"]["RssAnon"] for r in ranks)


def report(name: str, ranks: list[dict]) -> None:
    """One line per rank: time, CPU, memory before -> after, dataloader workers (vlmtune only)."""
    for r in ranks:
        workers = ", ".join(f"{w['RssAnon']:.0f} (Pss {w['Pss_Anon']:.0f})" for w in r.get("workers", []))
        before, after = r["rss_before"]["RssAnon"], r["rss_after"]["RssAnon"]
        print(f"{name} rank {r['rank']}: {r['order_s']:.2f} s to the first batch order (imports {r['imports_s']:.1f} s "
              f"before), CPU {r['cpu_s']:.0f} s; RssAnon {before:.0f} -> {after:.0f} MiB (dataset +{after - before:.0f})"
              + (f"; workers MiB: {workers}" if workers else ""))


def summarize(table: str, rounds: list[dict], naive: dict | None) -> None:
    """Round 1 in detail, then the per-round ratios against LLaVA-lazy and what they mean."""
    first = rounds[0]
    print(f"\n== {table} table: {first['cold'][0]['report']}; mean sequence {first['cold'][0]['mean_length']:.0f} tokens "
          f"(images expanded{', estimated' if table == 'lazy' else ''}); {first['cold'][0]['stored_ids'] / 1e6:.1f}M ids stored")
    for name in ("cold", "llava_cold", "warm", "llava_warm"):
        report(f"round 1 {name.replace('llava_', 'LLaVA-lazy after ')}", first[name])
    cold, lazy_cold, warm, lazy_warm = ([slowest(r[side]) for r in rounds] for side in ("cold", "llava_cold", "warm", "llava_warm"))
    med = statistics.median
    print(f"cold, tokenizer load -> first batch order, slowest rank: vlmtune {med(cold):.2f} s (target <= 60), LLaVA-lazy "
          f"{med(lazy_cold):.2f} s; LLaVA-lazy / vlmtune {spread(ratios(lazy_cold, cold), '.2f')}")
    print(f"warm: vlmtune {med(warm):.2f} s (target <= 5), LLaVA-lazy {med(lazy_warm):.2f} s (it has no cache: every "
          f"start is cold); LLaVA-lazy / vlmtune {spread(ratios(lazy_warm, warm), '.1f')}")
    ours_mem = [max(peak(r["cold"]), peak(r["warm"])) for r in rounds]
    lazy_mem = [max(peak(r["llava_cold"]), peak(r["llava_warm"])) for r in rounds]
    memory = ratios(lazy_mem, ours_mem)
    print(f"memory, RssAnon of the largest rank after its first batch order (target <= 1024 MiB): vlmtune {med(ours_mem):.0f} MiB "
          f"x {NODE} ranks = {med(ours_mem) * NODE / 1024:.1f} GiB per node; LLaVA-lazy {med(lazy_mem):.0f} MiB x {NODE} = "
          f"{med(lazy_mem) * NODE / 1024:.1f} GiB; LLaVA-lazy / vlmtune {spread(memory, '.1f')}")
    fetch = max(r["fetch_s"] for r in first["warm"])
    print(f"dataloader, warm: {LOADED_BATCHES - 1} batches of {BATCH} ({BATCH * (LOADED_BATCHES - 1)} samples with their "
          f"JPEGs{', tokenized in the workers' if table == 'lazy' else ''}) in {fetch:.2f} s incl. starting the workers")
    if naive and first["cold"][0]["stored_ids"]:
        floor = first["cold"][0]["stored_ids"] * naive["tokenizer_s_per_id"]
        cores = len(os.sched_getaffinity(0))
        print(f"the tokenizer alone: {naive['tokenizer_s_per_id'] * 1e6:.2f} us per id per core -> {floor:.0f} CPU-s for "
              f"the {first['cold'][0]['stored_ids'] / 1e6:.1f}M ids, a floor of {floor / cores:.1f} s on {cores} cores")
    verdict(table, ratios(lazy_cold, cold), ratios(lazy_warm, warm), memory)


def compare(x: float, better: str, worse: str) -> str:
    """'2.30x faster', '1.40x SLOWER' or 'about even' (within 10%) from a LLaVA-lazy / vlmtune ratio (above 1:
    vlmtune is better)."""
    if 1 / 1.1 <= x <= 1.1:
        return f"about even ({x:.2f}x)"
    return f"{x:.2f}x {better}" if x > 1 else f"{1 / x:.2f}x {worse}"


def verdict(table: str, cold: list[float], warm: list[float], memory: list[float]) -> None:
    """What the three ratios say, from the medians measured (not from expectations)."""
    c, w, m = (statistics.median(x) for x in (cold, warm, memory))
    if table == "tokens":
        print(f"vs LLaVA-lazy: not the same work at cold start (this table tokenizes every record up front, for packing's "
              f"exact lengths; LLaVA's lazy dataset tokenizes none): cold {compare(c, 'faster', 'SLOWER')}, warm "
              f"{compare(w, 'faster', 'SLOWER')}, memory per rank {compare(m, 'less', 'MORE')}")
        return
    print(f"vs LLaVA-lazy (neither tokenizes up front): cold start {compare(c, 'faster', 'SLOWER')}; warm start "
          f"{compare(w, 'faster', 'SLOWER')}, from the second start on (vlmtune's cache; LLaVA repeats its json.load at "
          f"every start); memory per rank {compare(m, 'less', 'MORE')}, at every start")
    if m >= max(c, 2):
        print(f"the memory ratio is the real win over LLaVA's lazy dataset: {m:.1f}x less anonymous memory on each of a "
              f"node's {NODE} ranks, from the first start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/vlmtune_bench/mix665k.json")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of cold, LLaVA-lazy, warm, LLaVA-lazy per table")
    ap.add_argument("--baseline-records", type=int, default=20000, help="records the naive line times (0: skip it)")
    ap.add_argument("--tables", nargs="+", choices=["lazy", "tokens"], default=["lazy", "tokens"])
    ap.add_argument("--table", choices=["lazy", "tokens"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["main", "rank", "llava", "naive"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--tokenizer", "--image-folder", "--cache"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode != "main":
        return {"rank": rank_main, "llava": llava_main, "naive": naive_main}[args.mode](args) or 0
    header(("torch", "transformers", "tokenizers", "pyarrow"))
    print("cold = fresh processes and an empty vlmtune cache; the OS page cache is NOT dropped (the JSON file is "
          "read from memory by both sides). warm = fresh processes, the cache present.")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        extra = prepare(args, Path(tmp))
        print(f"data: {args.data} ({Path(args.data).stat().st_size / 2**20:,.0f} MiB); {args.ranks} ranks; {load()}")
        rounds = {table: [] for table in args.tables}
        for i in range(args.rounds):
            print(f"round {i + 1} of {args.rounds}:")
            for table in args.tables:
                rounds[table].append(one_round(args, extra, table, Path(tmp) / f"cache_{table}_{i}"))
        naive = None if not args.baseline_records else \
            run("naive", args, [*extra, "--baseline-records", str(args.baseline_records)])[0]
    for table, table_rounds in rounds.items():
        summarize(table, table_rounds, naive)
    if naive:
        print(f"\nnaive, an extra line (json.load, then every record tokenized up front in one process; "
              f"{naive['measured']:,} of {naive['records']:,} records timed, extrapolated, run once: no ratio): json.load "
              f"{naive['load_s']:.1f} s, RssAnon {naive['rss_after_load']['RssAnon']:.0f} MiB after it; tokenize_conversation "
              f"{naive['per_record_s'] * 1e3:.2f} ms/record -> {naive['total_s']:.0f} s for the file")
    print(XTUNER)
    footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
