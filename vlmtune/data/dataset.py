"""The training dataset: LLaVA JSON tokenized once into a memory-mapped Arrow table, images loaded lazily.

Building reads every record, normalises and tokenizes it (one masking rule: data/tokenize.py) and writes
columns id, images, input_ids, labels, length, n_images to an Arrow file under a cache folder keyed by
everything that changes the tokens (data file, tokenizer, template, max_length, image length). The build
runs in parallel over chunks of the file (data/table.py). The first process to take the cache lock builds;
the others wait for it and memory-map the result, so ranks and dataloader workers share one copy of the
table through the page cache instead of holding Python objects each.

Records that cannot be trained on are counted per kind in a report (with the first examples) and left out.
Images are decoded in `__getitem__`; a sample whose image fails is replaced by the next good index (a
deterministic function of the index, so resume stays exact) and reported back through the batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vlmtune.config import DataConfig
from vlmtune.data.image import ImagePreprocessor, load_image, resolve_image_path
from vlmtune.data.llava_json import RecordError
from vlmtune.data.table import DataReport, Settings, write_table
from vlmtune.data.templates import get_template
from vlmtune.errors import UserError

FORMAT_VERSION = 2  # bump when the stored columns or the masking rule change


def cache_key(cfg: DataConfig, tokenizer, image_length: int) -> str:
    """Hash of every input that changes the tokenized table."""
    path = Path(cfg.data_path).resolve()
    if not path.is_file():  # the key is computed before anything reads the file: say it here, in one line
        raise UserError(f"{cfg.data_path}: data file not found; check `data_path` in the config")
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
            _write_cache(cfg, tokenizer, image_length, cache)
    report = DataReport(**json.loads((cache / "report.json").read_text()))
    return datasets.Dataset.from_file(str(cache / "table.arrow")), report


def _write_cache(cfg: DataConfig, tokenizer, image_length: int, cache: Path) -> None:
    """table.arrow, then report.json: written last, it marks the cache complete."""
    cache.mkdir(exist_ok=True)
    settings = Settings(cfg.data_path, get_template(cfg.prompt_template), cfg.max_length, image_length, cfg.system)
    report = write_table(settings, tokenizer, cache / "table.arrow.tmp")
    os.replace(cache / "table.arrow.tmp", cache / "table.arrow")
    (cache / "report.json.tmp").write_text(json.dumps(asdict(report), indent=1))
    os.replace(cache / "report.json.tmp", cache / "report.json")


class LlavaDataset(torch.utils.data.Dataset):
    """Arrow-backed samples: ids/labels from the table, pixels decoded on access."""

    def __init__(self, table, image_folder: str, preprocess: ImagePreprocessor, allowed_roots: tuple[str, ...] = ()):
        self.table = table.with_format("numpy", columns=["input_ids", "labels"], output_all_columns=True)
        self.image_folder = image_folder
        self.preprocess = preprocess
        self.allowed_roots = allowed_roots
        lengths = table.data.column("length").to_numpy().astype(np.int64)  # vectorised: no loop over rows
        has_image = table.data.column("n_images").to_numpy() > 0
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
