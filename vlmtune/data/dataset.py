"""The training dataset: LLaVA JSON tokenized once into a memory-mapped Arrow table, images loaded lazily.

Building reads every record, normalises and tokenizes it (one masking rule: data/tokenize.py) and writes
columns id, images, input_ids, labels, length to an Arrow file under a cache folder keyed by everything that
changes the tokens (data file, tokenizer, template, max_length, image length). The first process to take
the cache lock builds; the others wait for it and memory-map the result, so ranks and dataloader workers
share one copy of the table through the page cache instead of holding Python objects each.

Records that cannot be trained on are counted per kind in a report (with the first examples) and left out.
Images are decoded in `__getitem__`; a sample whose image fails is replaced by the next good index (a
deterministic function of the index, so resume stays exact) and reported back through the batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmtune.config import DataConfig
from vlmtune.data.image import ImagePreprocessor, load_image, resolve_image_path
from vlmtune.data.llava_json import RecordError, normalize_record, read_records
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation

FORMAT_VERSION = 1  # bump when the stored columns or the masking rule change
MAX_EXAMPLES = 5


@dataclass
class DataReport:
    """What building the dataset dropped, per kind, with the first examples (record index, id, detail)."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list] = field(default_factory=dict)
    truncated: int = 0

    def add(self, kind: str, index: int, record_id, detail: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        if len(self.examples.setdefault(kind, [])) < MAX_EXAMPLES:
            self.examples[kind].append({"index": index, "id": record_id, "detail": detail})

    def summary(self) -> str:
        """One line for the log."""
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.kept}/{self.total} records kept, {self.truncated} truncated; dropped: {parts}"


def cache_key(cfg: DataConfig, tokenizer, image_length: int) -> str:
    """Hash of every input that changes the tokenized table."""
    path = Path(cfg.data_path).resolve()
    stat = path.stat()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers expose their full definition
    tok_id = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    parts = [
        FORMAT_VERSION, str(path), stat.st_size, stat.st_mtime_ns, tok_id, repr(get_template(cfg.prompt_template)),
        cfg.max_length, image_length, cfg.system, tokenizer.bos_token_id, tokenizer.eos_token_id,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def build_table(cfg: DataConfig, tokenizer, image_length: int, cache_dir: str | Path):
    """Memory-mapped Arrow table for `cfg` (built once, under a lock) and its DataReport."""
    import datasets
    from filelock import FileLock

    cache = Path(cache_dir) / f"{Path(cfg.data_path).stem}-{cache_key(cfg, tokenizer, image_length)}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock", timeout=-1):  # other ranks wait here, without a timeout
        if not (cache / "report.json").is_file():
            _write_table(cfg, tokenizer, image_length, cache)
    report = DataReport(**json.loads((cache / "report.json").read_text()))
    return datasets.load_from_disk(str(cache / "table")), report


def _write_table(cfg: DataConfig, tokenizer, image_length: int, cache: Path) -> None:
    """Tokenize every record and save the table; report.json is written last, marking the cache complete."""
    import datasets

    template = get_template(cfg.prompt_template)
    report = DataReport()

    def rows():
        for index, raw in enumerate(read_records(cfg.data_path)):
            report.total += 1
            record_id = raw.get("id") if isinstance(raw, dict) else None
            try:
                sample = normalize_record(raw, index)
            except RecordError as e:
                report.add(e.kind, index, record_id, e.detail)
                continue
            tok = tokenize_conversation(sample.turns, tokenizer, template, cfg.max_length, image_length, sample.system or cfg.system)
            if not tok.trainable:
                report.add("no_trainable_tokens", index, sample.id, f"nothing left to train on within max_length={cfg.max_length}")
                continue
            if tok.num_images < len(sample.images):  # truncation dropped an image slot: drop its file too
                sample.images = sample.images[: tok.num_images]
            report.truncated += tok.truncated
            report.kept += 1
            yield {"id": sample.id, "images": sample.images, "input_ids": tok.input_ids,
                   "labels": tok.labels, "length": tok.length}

    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.Sequence(datasets.Value("string")),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    })
    datasets.disable_progress_bars()  # vlmtune logs its own summary; the per-shard bars are noise
    table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache) + ".tmp", keep_in_memory=False)
    table.save_to_disk(str(cache / "table"))
    tmp = cache / "report.json.tmp"
    tmp.write_text(json.dumps(asdict(report), indent=1))
    os.replace(tmp, cache / "report.json")


class LlavaDataset(torch.utils.data.Dataset):
    """Arrow-backed samples: ids/labels from the table, pixels decoded on access."""

    def __init__(self, table, image_folder: str, preprocess: ImagePreprocessor, allowed_roots: tuple[str, ...] = ()):
        self.table = table.with_format("numpy", columns=["input_ids", "labels"], output_all_columns=True)
        self.image_folder = image_folder
        self.preprocess = preprocess
        self.allowed_roots = allowed_roots
        lengths = np.asarray(table["length"], dtype=np.int64)
        has_image = np.asarray([len(x) > 0 for x in table["images"]]) if len(table) else np.zeros(0, bool)
        # LLaVA's modality length: positive for image samples, negative for text-only ones
        self.modality_lengths = np.where(has_image, lengths, -lengths)

    def __len__(self) -> int:
        return len(self.table)

    def load(self, index: int) -> dict:
        """Sample `index` or RecordError when one of its images cannot be used."""
        row = self.table[index]
        pixels = [self.preprocess(load_image(resolve_image_path(self.image_folder, p, self.allowed_roots))) for p in row["images"]]
        h, w = self.preprocess.crop_size
        return {
            "id": row["id"],
            "input_ids": torch.from_numpy(row["input_ids"].astype(np.int64)),
            "labels": torch.from_numpy(row["labels"].astype(np.int64)),
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, h, w),
        }

    def __getitem__(self, index: int) -> dict:
        """The sample, or the next loadable one; skipped samples ride along in `skipped`."""
        skipped = []
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                sample = self.load(i)
            except RecordError as e:
                skipped.append({"index": i, "id": self.table[i]["id"], "kind": e.kind, "detail": e.detail})
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError("no sample in the dataset has a loadable image")


def build_dataset(cfg: DataConfig, tokenizer, preprocess: ImagePreprocessor, image_length: int, cache_dir: str | Path):
    """(LlavaDataset, DataReport) for the config's data."""
    table, report = build_table(cfg, tokenizer, image_length, cache_dir)
    return LlavaDataset(table, cfg.image_folder, preprocess, tuple(cfg.allowed_image_roots)), report
