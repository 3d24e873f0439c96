"""Data startup on a synthetic mix665k: `train`'s data steps to the first batch order, cold and warm, and memory.

    python scripts/bench/bench_data_startup.py [--data /tmp/vlmtune_bench/mix665k.json] [--ranks 2]
        [--num-workers 2] [--baseline-records 20000] [--tables lazy tokens]

Writes the synthetic mix (scripts/bench/make_synthetic_mix.py) if `--data` does not exist, and the real 32k
Llama tokenizer (the SentencePiece model shipped in mistral-common, as a fast tokenizer.json). Then, each in
fresh processes:

- cold: an empty cache; `--ranks` rank processes start together and each runs what `vlmtune train` runs for
  its data - load_tokenizer, build_dataset (vicuna, max_length 2048, 576 tokens per image), BatchSampler
  (batch 16 per rank, length-grouped), first batch order - timed from the tokenizer load to the order. One
  rank builds the cache (all cores); the others wait on its lock;
- warm: the same with the cache present;
- for each table of `--tables`: `lazy` (the default of `vlmtune train` without packing: texts + estimated
  lengths, tokenized by the dataloader) and `tokens` (every record tokenized up front: what packing uses);
- the dataloader: `--num-workers` workers load 3 batches of real JPEGs (and, lazily, tokenize them): timed;
- memory: RssAnon (anonymous resident memory, /proc/<pid>/status) of each rank before and after the
  dataset, and of each of its `--num-workers` dataloader workers after they loaded 4 batches (JPEGs are
  written for exactly those samples);
- baseline, the naive way: json.load of the whole file + normalize_record + tokenize_conversation record by
  record in one process, timed on the first `--baseline-records` records and extrapolated to the file.

Prints the command, the machine and load average, every figure, and the ratios to the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH, LOADED_BATCHES = 16, 4


def rss(pid: int | str = "self") -> dict:
    """RssAnon and Pss_Anon (MiB) of a process."""
    out = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "Pss_Anon"):
                out[key] = int(value.split()[0]) / 1024
    return out


def child_pids() -> list[int]:
    """Processes whose parent is this one (the dataloader workers)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields["PPid"]) == os.getpid():
            pids.append(int(status.parent.name))
    return pids


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


def baseline_main(args) -> None:
    """The naive way, in one process: json.load, then normalize + tokenize record by record - through
    tokenize_conversation, and with one tokenizer.encode call per encoding unit (XTuner's encode_fn)."""
    from vlmtune.data.llava_json import normalize_record
    from vlmtune.data.templates import get_template
    from vlmtune.data.tokenize import encode_texts, render_units, special_ids, tokenize_conversation
    from vlmtune.model.build import load_tokenizer

    start, cpu = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(args.tokenizer)
    with open(args.data, encoding="utf-8") as f:
        records = json.load(f)
    load_s, load_cpu = time.perf_counter() - start, time.process_time() - cpu
    loaded = rss()
    template, n = get_template("vicuna"), min(args.baseline_records, len(records))
    samples = [normalize_record(raw, index) for index, raw in enumerate(records[:n])]
    t, cpu = time.perf_counter(), time.process_time()
    for sample in samples:
        tokenize_conversation(sample.turns, tokenizer, template, 2048, 576, sample.system)
    per_record, per_record_cpu = (time.perf_counter() - t) / n, (time.process_time() - cpu) / n
    bos, eos = special_ids(tokenizer)
    t = time.perf_counter()
    for sample in samples:
        for unit, _ in render_units(sample.turns, template, sample.system, bos, eos):
            if isinstance(unit, str):
                tokenizer.encode(unit, add_special_tokens=False)
    per_unit = (time.perf_counter() - t) / n
    texts = [u for s in samples for u, _ in render_units(s.turns, template, s.system, bos, eos) if isinstance(u, str)]
    t = time.process_time()  # this process runs with TOKENIZERS_PARALLELISM=false: one core
    ids = sum(map(len, encode_texts(texts, tokenizer)))
    print(json.dumps({"tokenizer_s_per_id": (time.process_time() - t) / ids,"load_s": load_s, "records": len(records), "measured": n, "rss_after_load": loaded,
                      "total_s": load_s + per_record * len(records), "per_record_s": per_record,
                      "per_unit_total_s": load_s + per_unit * len(records), "per_unit_s": per_unit,
                      "total_cpu_s": load_cpu + per_record_cpu * len(records)}))


def run(mode: str, args, extra: list[str], count: int = 1) -> list[dict]:
    """Start `count` processes of this script in `mode` together; their JSON lines."""
    procs = []
    for rank in range(count):
        cmd = [sys.executable, __file__, "--mode", mode, "--rank", str(rank), *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", RANK=str(rank), WORLD_SIZE=str(count))
        if mode == "baseline":
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
            "--cache", str(work / "cache"), "--ranks", str(args.ranks), "--num-workers", str(args.num_workers)]


def machine() -> str:
    import tokenizers
    import torch
    import transformers

    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def report(name: str, ranks: list[dict]) -> None:
    for r in ranks:
        workers = ", ".join(f"{w['RssAnon']:.0f} (Pss {w['Pss_Anon']:.0f})" for w in r["workers"])
        print(f"{name} rank {r['rank']}: {r['order_s']:.2f} s to the first batch order (imports {r['imports_s']:.1f} s "
              f"before), CPU {r['cpu_s']:.0f} s; RssAnon {r['rss_before']['RssAnon']:.0f} -> {r['rss_after']['RssAnon']:.0f} MiB "
              f"(dataset +{r['rss_after']['RssAnon'] - r['rss_before']['RssAnon']:.0f}); workers MiB: {workers}")


def summarize(table: str, cold: list[dict], warm: list[dict], base: dict) -> None:
    """Every figure of one table kind, with its ratios to the baseline."""
    print(f"\n== {table} table: {cold[0]['report']}; mean sequence {cold[0]['mean_length']:.0f} tokens (images "
          f"expanded{', estimated' if table == 'lazy' else ''}); {cold[0]['stored_ids'] / 1e6:.0f}M ids stored")
    report("cold", cold)
    report("warm", warm)
    cold_s, warm_s = max(r["order_s"] for r in cold), max(r["order_s"] for r in warm)
    cores = len(os.sched_getaffinity(0))
    print(f"cold {cold_s:.1f} s (target <= 60): {base['total_s'] / cold_s:.1f}x faster than the baseline "
          f"({base['per_unit_total_s'] / cold_s:.1f}x than per-unit encode); "
          f"{max(r['cpu_s'] for r in cold):.0f} CPU-s (the baseline: {base['total_cpu_s']:.0f}) on {cores} cores")
    if cold[0]["stored_ids"]:
        floor = cold[0]["stored_ids"] * base["tokenizer_s_per_id"]
        print(f"the tokenizer alone: {base['tokenizer_s_per_id'] * 1e6:.2f} us per id per core -> {floor:.0f} CPU-s for "
              f"the {cold[0]['stored_ids'] / 1e6:.0f}M ids, a floor of {floor / cores:.0f} s on {cores} cores")
    print(f"warm {warm_s:.2f} s (target <= 5): {base['total_s'] / warm_s:.0f}x faster than the baseline")
    fetch = max(r["fetch_s"] for r in warm)
    print(f"dataloader, warm: {LOADED_BATCHES - 1} batches of {BATCH} ({BATCH * (LOADED_BATCHES - 1)} samples with their "
          f"JPEGs{', tokenized in the workers' if table == 'lazy' else ''}) in {fetch:.2f} s incl. starting the workers")
    worst = max(r["rss_after"]["RssAnon"] for r in cold + warm)
    print(f"max rank RssAnon {worst:.0f} MiB (target <= 1024); baseline after json.load alone "
          f"{base['rss_after_load']['RssAnon']:.0f} MiB ({base['rss_after_load']['RssAnon'] / worst:.1f}x)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/vlmtune_bench/mix665k.json")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--baseline-records", type=int, default=20000)
    ap.add_argument("--tables", nargs="+", choices=["lazy", "tokens"], default=["lazy", "tokens"])
    ap.add_argument("--table", choices=["lazy", "tokens"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["main", "rank", "baseline"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--tokenizer", "--image-folder", "--cache"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode == "rank":
        return rank_main(args) or 0
    if args.mode == "baseline":
        return baseline_main(args) or 0
    print("command: python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]))
    print("machine: " + machine())
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        extra = prepare(args, Path(tmp))
        print(f"data: {args.data} ({Path(args.data).stat().st_size / 2**20:,.0f} MiB); {load()}")
        for table in args.tables:
            results[table] = [run("rank", args, [*extra, "--table", table], args.ranks) for _ in ("cold", "warm")]
            print(f"{table} table: cold and warm done; {load()}")
        base = run("baseline", args, [*extra, "--baseline-records", str(args.baseline_records)])[0]
        print(f"baseline done; {load()}")
    print(f"baseline (json.load, then record by record; {base['measured']:,} of {base['records']:,} records timed): "
          f"json.load {base['load_s']:.1f} s, RssAnon {base['rss_after_load']['RssAnon']:.0f} MiB after it; "
          f"tokenize_conversation {base['per_record_s'] * 1e3:.2f} ms/record -> {base['total_s']:.0f} s for the file; "
          f"one tokenizer.encode per unit (XTuner's encode_fn) {base['per_unit_s'] * 1e3:.2f} ms/record -> "
          f"{base['per_unit_total_s']:.0f} s")
    for table, (cold, warm) in results.items():
        summarize(table, cold, warm, base)
    print(load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
