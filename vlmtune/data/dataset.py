"""The training dataset: LLaVA JSON read once into a memory-mapped Arrow table, images loaded lazily.

Building reads every record, normalises it and writes it to an Arrow file under a cache folder keyed by
everything that changes the rows (data file, tokenizer, template, max_length, image length, lazy or not, and
the source of the modules that make the rows: `RULE_MODULES`).
The build runs in parallel over chunks of the file (data/table.py). The first process to take the cache
lock builds; the others wait for it and memory-map the result, so ranks and dataloader workers share one
copy of the table through the page cache instead of holding Python objects each.

Two ways to tokenize (`lazy_tokenize`; the masking rule is data/tokenize.py either way):
- lazy (the default unless packing): the table holds the turns and an estimated length (for grouping);
  `__getitem__` tokenizes the sample, as LLaVA's LazySupervisedDataset does. A 665K-record file is ready in
  seconds instead of minutes; a sample left with nothing to train on by truncation is skipped when loaded.
- up front: the table holds ids/labels with exact lengths, which token-budget packing needs; records with
  nothing to train on are left out when building.

Records that cannot be trained on are counted per kind in a report (with the first examples) and left out.
Images are decoded in `__getitem__`; a sample whose image (or, lazily, whose tokens) cannot be used is
replaced by the next good index (a deterministic function of the index, so resume stays exact) and reported
back through the batch.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmtune.config import DataConfig
from vlmtune.data.image import ImagePreprocessor, load_image, resolve_image_path
from vlmtune.data.llava_json import RecordError
from vlmtune.data.table import DataReport, Settings, row_sizes, write_table
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import Tokenized, tokenize_conversation
from vlmtune.errors import UserError
from vlmtune.model.anyres import AnyRes

# The modules whose source decides a table's rows, hashed into every cache key instead of a version number
# someone must remember to bump: record boundaries and lines (reader), normalisation (llava_json), templates
# and the masking rule (templates, tokenize), the stored columns (table), the ids stored for images and
# ignored labels (constants), and with AnyRes image sizes (image: header reading, path resolution) and their
# token counts (model.anyres). Any edit to one of them rebuilds every cache, a comment-only edit too: the
# price of never reusing a stale cache.
RULE_MODULES = ("vlmtune.constants", "vlmtune.data.image", "vlmtune.data.llava_json", "vlmtune.data.reader",
                "vlmtune.data.table", "vlmtune.data.templates", "vlmtune.data.tokenize", "vlmtune.model.anyres")


def tokenizes_lazily(cfg: DataConfig) -> bool:
    """`lazy_tokenize`, or when unset: lazily unless packing (the packer needs exact lengths)."""
    return cfg.lazy_tokenize if cfg.lazy_tokenize is not None else not cfg.pack_to_max_length


def rule_source(name: str) -> bytes:
    """The source file of the module `name` (one of RULE_MODULES), as the cache key hashes it."""
    return Path(importlib.import_module(name).__file__).read_bytes()


def rules_digest() -> str:
    """sha256 of the source of every module in RULE_MODULES."""
    digest = hashlib.sha256()
    for name in RULE_MODULES:
        digest.update(name.encode() + b"\0" + rule_source(name))
    return digest.hexdigest()


def cache_key(cfg: DataConfig, tokenizer, image_length: int, anyres: AnyRes | None = None) -> str:
    """Hash of every input that changes the table: the data file, the tokenizer's definition, every field of
    the template, the settings, the table kind and the source of the rules (`rules_digest`); with AnyRes also
    the tiling and where the images are (their sizes are read into the table: an image replaced by one of
    another size at the same path is caught when the sample is loaded, `LlavaDataset.load`)."""
    path = Path(cfg.data_path).resolve()
    if not path.is_file():  # the key is computed before anything reads the file: say it here, in one line
        raise UserError(f"{cfg.data_path}: data file not found; check `data_path` in the config")
    stat = path.stat()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers expose their full definition
    tok_id = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    parts = [
        rules_digest(), str(path), stat.st_size, stat.st_mtime_ns, tok_id, asdict(get_template(cfg.prompt_template)),
        cfg.max_length, image_length, cfg.system, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizes_lazily(cfg),
    ]
    if anyres is not None:
        parts += [asdict(anyres), os.path.abspath(cfg.image_folder), [os.path.abspath(r) for r in cfg.allowed_image_roots]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def cache_dir(cfg: DataConfig, work_dir: Path) -> Path:
    """Tokenization cache: the config's `cache_dir`, else work_dirs/.cache (shared by runs over the same data)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else work_dir.parent / ".cache" / "vlmtune"


def build_table(cfg: DataConfig, tokenizer, image_length: int, cache_dir: str | Path, anyres: AnyRes | None = None):
    """Memory-mapped Arrow table for `cfg` (built once, under a lock) and its DataReport; `image_length`:
    positions per image, with `anyres` the most (each image then counts its own, data/table.py)."""
    import datasets
    from filelock import FileLock

    cache = Path(cache_dir) / f"{Path(cfg.data_path).stem}-{cache_key(cfg, tokenizer, image_length, anyres)}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock", timeout=-1):  # other ranks wait here, without a timeout
        if not (cache / "report.json").is_file():
            _write_cache(table_settings(cfg, image_length, anyres), tokenizer, tokenizes_lazily(cfg), cache)
    report = DataReport(**json.loads((cache / "report.json").read_text()))
    return datasets.Dataset.from_file(str(cache / "table.arrow")), report


def _write_cache(settings: Settings, tokenizer, lazy: bool, cache: Path) -> None:
    """table.arrow, then report.json: written last, it marks the cache complete."""
    cache.mkdir(exist_ok=True)
    report = write_table(settings, tokenizer, cache / "table.arrow.tmp", lazy)
    os.replace(cache / "table.arrow.tmp", cache / "table.arrow")
    (cache / "report.json.tmp").write_text(json.dumps(asdict(report), indent=1))
    os.replace(cache / "report.json.tmp", cache / "report.json")


def table_settings(cfg: DataConfig, image_length: int, anyres: AnyRes | None = None) -> Settings:
    """What besides the tokenizer decides a record's tokens."""
    return Settings(cfg.data_path, get_template(cfg.prompt_template), cfg.max_length, image_length, cfg.system,
                    anyres=anyres, image_folder=cfg.image_folder, allowed_roots=tuple(cfg.allowed_image_roots))


@dataclass
class RowTokenizer:
    """Tokenizes a text table's row when it is loaded (lazy tokenization): the ids/labels the token table holds."""

    tokenizer: object
    settings: Settings

    def __call__(self, row: dict) -> Tokenized:
        """The row's Tokenized, or RecordError when truncation leaves nothing to train on."""
        s = self.settings
        turns = list(zip(row["users"], row["answers"]))
        tok = tokenize_conversation(turns, self.tokenizer, s.template, s.max_length, s.row_image_length(row),
                                    row["system"])
        if not tok.trainable:
            raise RecordError("no_trainable_tokens", f"nothing left to train on within max_length={s.max_length}")
        return tok


class LlavaDataset(torch.utils.data.Dataset):
    """Arrow-backed samples: ids/labels from the table (or, lazily, by `row_tokenizer`), pixels decoded on access."""

    def __init__(self, table, image_folder: str, preprocess: ImagePreprocessor, allowed_roots: tuple[str, ...] = (),
                 row_tokenizer: RowTokenizer | None = None):
        self.row_tokenizer = row_tokenizer
        if "input_ids" in table.column_names:  # a token table (a text table is tokenized by row_tokenizer)
            table = table.with_format("numpy", columns=["input_ids", "labels"], output_all_columns=True)
        self.table = table
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
        if self.row_tokenizer is None:
            input_ids, labels, images = row["input_ids"].astype(np.int64), row["labels"].astype(np.int64), row["images"]
        else:
            tok = self.row_tokenizer(row)  # a truncation that dropped an image slot drops its file too
            input_ids, labels, images = np.array(tok.input_ids), np.array(tok.labels), row["images"][: tok.num_images]
        loaded = [load_image(resolve_image_path(self.image_folder, p, self.allowed_roots)) for p in images]
        for path, image, size in zip(images, loaded, row_sizes(row["image_sizes"])):  # sizes: AnyRes tables only
            if (image.height, image.width) != size:  # its token count in the table would be wrong
                raise RecordError("image_changed", f"{path} is {image.height}x{image.width} but was {size[0]}x{size[1]} "
                                  f"when the data cache was built; delete the cache folder to rebuild it")
        h, w = self.preprocess.crop_size
        return {
            "id": row["id"],
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            # [T, 3, H, W]: one tensor per image, several tiles each with AnyRes; [n, 2] (height, width) per image
            "pixel_values": torch.cat([self.preprocess.tiles(im) for im in loaded]) if loaded else torch.zeros(0, 3, h, w),
            "image_sizes": torch.tensor([(im.height, im.width) for im in loaded], dtype=torch.long).reshape(-1, 2),
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


def build_dataset(cfg: DataConfig, tokenizer, preprocess: ImagePreprocessor, image_length: int, cache_dir: str | Path,
                  anyres: AnyRes | None = None):
    """(LlavaDataset, DataReport) for the config's data; `image_length` and `anyres`: as `build_table`."""
    table, report = build_table(cfg, tokenizer, image_length, cache_dir, anyres)
    row_tokenizer = RowTokenizer(tokenizer, table_settings(cfg, image_length, anyres)) if report.lazy else None
    return LlavaDataset(table, cfg.image_folder, preprocess, tuple(cfg.allowed_image_roots), row_tokenizer), report
