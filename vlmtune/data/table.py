"""The token table of a data file, built in parallel: chunks of records -> workers -> one Arrow file.

The main process cuts the file into chunks of whole records without parsing them
(`llava_json.record_chunks`); each worker parses a chunk, normalises its records, tokenizes them all at
once (data/tokenize.py: the one masking rule, one batched Rust encode per chunk) and sends back an Arrow
record batch of flat int32 columns; the main process appends the batches, in file order, to one Arrow IPC
file that every rank and dataloader worker then memory-maps. Workers are forked (they inherit the
tokenizer), one per CPU core; with one core, or one chunk, it all runs in this process.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlmtune.data.llava_json import Chunk, RecordError, check_syntax, normalize_record, parse_chunk, record_chunks
from vlmtune.data.templates import Template
from vlmtune.data.tokenize import tokenize_conversations

MAX_EXAMPLES = 5
COLUMNS = pa.schema([
    ("id", pa.string()), ("images", pa.list_(pa.string())), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())), ("length", pa.int32()), ("n_images", pa.int32()),
])


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
        return f"{self.kept}/{self.total} records kept, {self.truncated} truncated; dropped: {parts}"


@dataclass(frozen=True)
class Settings:
    """Everything besides the tokenizer that decides a record's tokens."""

    data_path: str
    template: Template
    max_length: int
    image_length: int
    system: str


def write_table(settings: Settings, tokenizer, path: Path) -> DataReport:
    """Tokenize every record of `settings.data_path` into the Arrow file `path`; the report of what was dropped."""
    report = DataReport()
    chunks = record_chunks(settings.data_path)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, COLUMNS) as writer:
        try:
            for part, batch in _map_chunks(chunks, tokenizer, settings):
                report.merge(part)
                writer.write_batch(batch)
        except (ValueError, UnicodeDecodeError):  # a chunk that does not parse: raise the located syntax error
            check_syntax(settings.data_path)
            raise
    return report


def _map_chunks(chunks, tokenizer, settings: Settings):
    """(DataReport, RecordBatch) of every chunk, in file order, from a pool of forked workers."""
    chunks = iter(chunks)
    head = [c for _, c in zip(range(2), chunks)]
    workers = min(len(os.sched_getaffinity(0)), 32)
    if workers < 2 or len(head) < 2:
        for chunk in [*head, *chunks]:
            yield tokenize_chunk(chunk, tokenizer, settings)
        return
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer, settings)) as pool:
        yield from pool.imap(_work, itertools.chain(head, chunks))


_WORKER: dict = {}  # this worker process's tokenizer and settings, set once by _init_worker


def _init_worker(tokenizer, settings: Settings) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads on top
    _WORKER.update(tokenizer=tokenizer, settings=settings)


def _work(chunk: Chunk):
    return tokenize_chunk(chunk, _WORKER["tokenizer"], _WORKER["settings"])


def tokenize_chunk(chunk: Chunk, tokenizer, settings: Settings) -> tuple[DataReport, pa.RecordBatch]:
    """Parse, normalise and tokenize the records of one chunk: its report and the rows it keeps."""
    report = DataReport(total=chunk.count)
    samples, indices = [], []
    for index, raw in enumerate(parse_chunk(settings.data_path, chunk), start=chunk.first):
        try:
            samples.append(normalize_record(raw, index))
            indices.append(index)
        except RecordError as e:
            report.add(e.kind, index, raw.get("id") if isinstance(raw, dict) else None, e.detail)
    tok = tokenize_conversations([(s.turns, s.system or settings.system) for s in samples], tokenizer,
                                 settings.template, settings.max_length, settings.image_length)
    for k in np.flatnonzero(~tok.trainable):
        report.add("no_trainable_tokens", indices[k], samples[k].id,
                   f"nothing left to train on within max_length={settings.max_length}")
    keep = np.flatnonzero(tok.trainable)
    report.kept, report.truncated = len(keep), int(tok.truncated[keep].sum())
    # a truncation that dropped an image slot drops its file too
    images = [samples[k].images[: tok.num_images[k]] for k in keep.tolist()]
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
    ], schema=COLUMNS)
    return report, batch
