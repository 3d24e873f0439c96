"""The table of a data file, built in parallel: chunks of records -> workers -> one Arrow file.

The file is read by the reader `data check` uses (data/reader.py): the main process cuts it into chunks of
whole records without parsing them, each worker frames a chunk into records, normalises them and sends back
an Arrow record batch; the main process appends the batches, in file order, to one Arrow IPC file that every
rank and dataloader worker then memory-maps. Workers are forked (they inherit the tokenizer), one per CPU
core; with one core, or one chunk, it all runs in this process.

Two kinds of table:
- tokens (`tokenize_chunk`): every record tokenized at once (data/tokenize.py: the one masking rule, one
  batched Rust encode per chunk) into flat int32 ids/labels with exact lengths - what packing needs;
- texts (`text_chunk`, lazy tokenization): the normalised turns and an estimated length, tokenized later
  sample by sample in the dataloader, as LLaVA's LazySupervisedDataset does. Building skips the tokenizer,
  which is ~90% of the token table's build. The estimate is exact for images and special ids; the text's
  tokens come from a linear model of its byte counts (letters, digits, punctuation, spaces, pieces) fitted
  by least squares on the file's first records, exactly tokenized (`fit_length_model`). On the 665K mix with
  a 32k Llama tokenizer it is off by 7.0 tokens per record on average, 0.8% of the tokens
  (scripts/bench/bench_batching.py).

How many positions an image takes: `image_length` for every image, or with AnyRes (`anyres`) a count that
follows the image's size. Then the workers read each image's (height, width) from its header (no decode),
store it in the table's `image_sizes` ([h0, w0, h1, w1, ...] per row) and count each image at its own
`AnyRes.tokens`: lengths, grouping, packing and `max_length` truncation are exact before any pixel is
decoded. A record whose image header cannot be read is dropped at the build, reported by kind like the others.
"""
from __future__ import annotations

import itertools
import os
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlmtune.constants import IMAGE_TOKEN_INDEX
from vlmtune.data.image import image_size, resolve_image_path
from vlmtune.data.llava_json import RecordError, Sample, normalize_record
from vlmtune.data.reader import (
    Chunk,
    JSONSyntaxError,
    Record,
    read_chunk,
    record_chunks,
)
from vlmtune.data.templates import Template
from vlmtune.data.tokenize import (
    encode_texts,
    render_units,
    special_ids,
    tokenize_conversations,
)
from vlmtune.data.workers import map_chunks
from vlmtune.model.anyres import AnyRes, image_positions

MAX_EXAMPLES = 5
COLUMNS = pa.schema([
    ("id", pa.string()), ("images", pa.list_(pa.string())), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())), ("length", pa.int32()), ("n_images", pa.int32()),
    ("image_sizes", pa.list_(pa.int32())),
])
TEXT_COLUMNS = pa.schema([
    ("id", pa.string()), ("images", pa.list_(pa.string())), ("users", pa.list_(pa.string())),
    ("answers", pa.list_(pa.string())), ("system", pa.string()), ("length", pa.int32()), ("n_images", pa.int32()),
    ("image_sizes", pa.list_(pa.int32())),
])
CALIBRATION_RECORDS = 1000  # records of the file's first chunk tokenized to fit the length model
DIGITS, PUNCTUATION = string.digits.encode(), string.punctuation.encode()


@dataclass
class DataReport:
    """What building the dataset dropped, per kind, with the first examples (record index, line, id, detail)."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list] = field(default_factory=dict)
    truncated: int = 0
    lazy: bool = False  # a text table: truncation and answers left empty by it are found in the dataloader

    def add(self, kind: str, record: Record, record_id, detail: str) -> None:
        """Count one dropped record."""
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        if len(self.examples.setdefault(kind, [])) < MAX_EXAMPLES:
            self.examples[kind].append({"index": record.index, "line": record.line, "id": record_id, "detail": detail})

    def merge(self, later: DataReport) -> None:
        """Add the report of the records that follow these ones (examples stay the first ones, in file order)."""
        self.total, self.kept, self.truncated = self.total + later.total, self.kept + later.kept, self.truncated + later.truncated
        for kind, count in later.dropped.items():
            self.dropped[kind] = self.dropped.get(kind, 0) + count
            ours = self.examples.setdefault(kind, [])
            ours += later.examples[kind][: MAX_EXAMPLES - len(ours)]

    def summary(self) -> str:
        """One line for the log."""
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        if self.lazy:
            return f"{self.kept}/{self.total} records kept, tokenized in the dataloader; dropped: {parts}"
        return f"{self.kept}/{self.total} records kept, {self.truncated} truncated; dropped: {parts}"


@dataclass(frozen=True)
class Settings:
    """Everything besides the tokenizer that decides a record's tokens."""

    data_path: str
    template: Template
    max_length: int
    image_length: int  # positions of every image; with `anyres` the most one can take
    system: str
    length_model: tuple[float, ...] | None = None  # set: a text table (lazy tokenization), lengths estimated by it
    anyres: AnyRes | None = None  # set: each image counts AnyRes.tokens(its size), read from its header
    image_folder: str = ""  # where the images are (read only with `anyres`)
    allowed_roots: tuple[str, ...] = ()

    def image_lengths(self, sizes) -> list[int]:
        """Positions of images of (height, width) `sizes` (model/anyres.py `image_positions`; without AnyRes only
        their number counts)."""
        return image_positions(sizes, self.image_length, self.anyres)

    def row_image_length(self, row: dict) -> int | list[int]:
        """A table row's image positions as tokenize takes them: `image_length` for every image, or with AnyRes
        each image's own from the row's stored `image_sizes`."""
        return self.image_length if self.anyres is None else self.image_lengths(row_sizes(row["image_sizes"]))


def write_table(settings: Settings, tokenizer, path: Path, lazy: bool = False) -> DataReport:
    """Every record of `settings.data_path` into the Arrow file `path`, tokenized or (`lazy`) as texts;
    the report of what was dropped. A JSON syntax error that ends a list is raised, located."""
    report = DataReport(lazy=lazy)
    chunks = record_chunks(settings.data_path)
    head = list(itertools.islice(chunks, 1))
    if lazy:
        model = fit_length_model(head[0], tokenizer, settings) if head else (0.0,) * 5
        settings = replace(settings, length_model=model)
    workers = min(len(os.sched_getaffinity(0)), 32)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, TEXT_COLUMNS if lazy else COLUMNS) as writer:
        for _, (part, batch) in map_chunks(settings.data_path, itertools.chain(head, chunks), chunk_rows,
                                           (tokenizer, settings), workers):
            report.merge(part)
            writer.write_batch(batch)
    return report


def chunk_rows(context: tuple, records: list[Record]) -> tuple[DataReport, pa.RecordBatch]:
    """The rows of a chunk's records for the table `settings` asks for (what a worker runs); context:
    (tokenizer, settings)."""
    tokenizer, settings = context
    if settings.length_model is None:
        return tokenize_chunk(records, tokenizer, settings)
    return text_chunk(records, tokenizer, settings)


def normalize_chunk(records: list[Record], settings: Settings) -> tuple[DataReport, list[Sample], list[Record], list]:
    """Normalise a chunk's records: (report of the bad ones, samples, the records they come from, each
    sample's image sizes: [(height, width)] read from the headers with `settings.anyres`, else [])."""
    report = DataReport(total=len(records))
    samples, kept, sizes = [], [], []
    for record in records:
        raw = record.value
        if isinstance(raw, JSONSyntaxError):  # a JSONL line that does not parse: `data check`'s json_syntax
            report.add("json_syntax", record, None, raw.detail)
            continue
        try:
            sample = normalize_record(raw, record.index)
            sizes.append(header_sizes(sample.images, settings) if settings.anyres is not None else [])
            samples.append(sample)
            kept.append(record)
        except RecordError as e:
            report.add(e.kind, record, raw.get("id") if isinstance(raw, dict) else None, e.detail)
    return report, samples, kept, sizes


def header_sizes(images: list[str], settings: Settings) -> list[tuple[int, int]]:
    """(height, width) of each image, from its header; RecordError for one that cannot be read."""
    return [image_size(resolve_image_path(settings.image_folder, p, settings.allowed_roots)) for p in images]


def sizes_column(sizes: list) -> pa.Array:
    """Each row's image sizes, flattened [h0, w0, h1, w1, ...] (the `image_sizes` column)."""
    offsets = np.concatenate([[0], np.cumsum([2 * len(x) for x in sizes])]).astype(np.int32)
    return pa.ListArray.from_arrays(offsets, pa.array([v for x in sizes for hw in x for v in hw], pa.int32()))


def row_sizes(flat) -> list[tuple[int, int]]:
    """A row's `image_sizes` column back as [(height, width), ...]."""
    flat = list(flat)
    return list(zip(flat[0::2], flat[1::2]))


def text_features(texts: list[str]) -> list[int]:
    """[other bytes, digits, punctuation, spaces and newlines, pieces] of `texts` (UTF-8): what a token count
    follows (Llama-style tokenizers give each digit a token, a word or a punctuation mark about one each,
    and every separately encoded piece a few)."""
    b = "".join(texts).encode()
    digits, punctuation = len(b) - len(b.translate(None, DIGITS)), len(b) - len(b.translate(None, PUNCTUATION))
    return [len(b) - digits - punctuation, digits, punctuation, b.count(b" ") + b.count(b"\n"), len(texts)]


def fit_length_model(chunk: Chunk, tokenizer, settings: Settings) -> tuple[float, ...]:
    """Least-squares weights of `text_features` for the token count of one encoded text, fitted on every text
    of the chunk's first CALIBRATION_RECORDS good records (a syntax error in the chunk is left to the build)."""
    records, _ = read_chunk(settings.data_path, chunk)
    _, samples, _, _ = normalize_chunk(records, replace(settings, anyres=None))  # text only: no image is read
    bos, eos = special_ids(tokenizer)
    texts = [u for s in samples[:CALIBRATION_RECORDS]
             for u, _ in render_units(s.turns, settings.template, s.system or settings.system, bos, eos) if isinstance(u, str)]
    if not texts:
        return (0.0,) * 5
    counts = np.array([len(ids) for ids in encode_texts(texts, tokenizer)], dtype=np.float64)
    weights, *_ = np.linalg.lstsq(np.array([text_features([t]) for t in texts], dtype=np.float64), counts, rcond=None)
    return tuple(weights.tolist())


def estimate_length(units, settings: Settings, image_lengths: list[int]) -> int:
    """A rendered sample's length: images (`image_lengths`, one per image) and special ids exact, text by the
    length model; capped at max_length."""
    texts = [u for u, _ in units if isinstance(u, str)]
    images = sum(1 for u, _ in units if not isinstance(u, str) and u == IMAGE_TOKEN_INDEX)
    ids = len(units) - len(texts) - images
    text = max(0, round(sum(w * f for w, f in zip(settings.length_model, text_features(texts))))) if texts else 0
    return min(settings.max_length, sum(image_lengths) + ids + text)


def text_chunk(records: list[Record], tokenizer, settings: Settings) -> tuple[DataReport, pa.RecordBatch]:
    """Normalise a chunk's records: its report and the rows it keeps, as texts with an estimated length (the
    tokenizer itself is not run)."""
    report, samples, _, sizes = normalize_chunk(records, settings)
    report.kept, report.lazy = len(samples), True
    bos, eos = special_ids(tokenizer)
    systems = [s.system or settings.system for s in samples]
    lengths = [estimate_length(render_units(s.turns, settings.template, system, bos, eos), settings,
                               settings.image_lengths(hw if settings.anyres else s.images))
               for s, system, hw in zip(samples, systems, sizes)]
    turn_offsets = np.concatenate([[0], np.cumsum([len(s.turns) for s in samples])]).astype(np.int32)
    image_offsets = np.concatenate([[0], np.cumsum([len(s.images) for s in samples])]).astype(np.int32)
    batch = pa.RecordBatch.from_arrays([
        pa.array([s.id for s in samples], pa.string()),
        pa.ListArray.from_arrays(image_offsets, pa.array([p for s in samples for p in s.images], pa.string())),
        pa.ListArray.from_arrays(turn_offsets, pa.array([u for s in samples for u, _ in s.turns], pa.string())),
        pa.ListArray.from_arrays(turn_offsets, pa.array([a for s in samples for _, a in s.turns], pa.string())),
        pa.array(systems, pa.string()),
        pa.array(np.asarray(lengths, dtype=np.int32)),
        pa.array(np.asarray([len(s.images) for s in samples], dtype=np.int32)),
        sizes_column(sizes),
    ], schema=TEXT_COLUMNS)
    return report, batch


def tokenize_chunk(records: list[Record], tokenizer, settings: Settings) -> tuple[DataReport, pa.RecordBatch]:
    """Normalise and tokenize a chunk's records: its report and the rows it keeps."""
    report, samples, kept, sizes = normalize_chunk(records, settings)
    # one count for all images, or with AnyRes each image's own
    image_lengths = settings.image_length if settings.anyres is None else [settings.image_lengths(hw) for hw in sizes]
    tok = tokenize_conversations([(s.turns, s.system or settings.system) for s in samples], tokenizer,
                                 settings.template, settings.max_length, image_lengths)
    for k in np.flatnonzero(~tok.trainable):
        report.add("no_trainable_tokens", kept[k], samples[k].id,
                   f"nothing left to train on within max_length={settings.max_length}")
    keep = np.flatnonzero(tok.trainable)
    report.kept, report.truncated = len(keep), int(tok.truncated[keep].sum())
    # a truncation that dropped an image slot drops its file too
    images = [samples[k].images[: tok.num_images[k]] for k in keep.tolist()]
    kept_sizes = [sizes[k][: tok.num_images[k]] for k in keep.tolist()]
    token_keep = np.repeat(tok.trainable, np.diff(tok.offsets))
    offsets = np.concatenate([[0], np.cumsum(np.diff(tok.offsets)[keep])]).astype(np.int32)
    image_offsets = np.concatenate([[0], np.cumsum([len(x) for x in images])]).astype(np.int32)
    batch = pa.RecordBatch.from_arrays([
        pa.array([samples[k].id for k in keep.tolist()], pa.string()),
        pa.ListArray.from_arrays(image_offsets, pa.array([p for x in images for p in x], pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(tok.input_ids[token_keep])),
        pa.ListArray.from_arrays(offsets, pa.array(tok.labels[token_keep])),
        pa.array(tok.lengths[keep].astype(np.int32)),
        pa.array(tok.num_images[keep].astype(np.int32)),
        sizes_column(kept_sizes),
    ], schema=COLUMNS)
    return report, batch
