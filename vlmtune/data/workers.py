"""Records of a data file handed to worker processes, chunk by chunk, results back in file order.

The one pool both `vlmtune data check` and the training table build use: the chunks come from
reader.record_chunks, each worker frames them with reader.read_chunk (the one definition of a record), and a
syntax error that ends a JSON list is raised once the records before it are delivered. Kept apart from
reader.py: the dataset cache key hashes the source of the modules that decide records (data/dataset.py), and
how work is spread over processes does not.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vlmtune.data.reader import Chunk, JSONSyntaxError, Record, read_chunk

IN_FLIGHT = 4  # chunks per worker handed out ahead of the one being read back

Work = Callable[[object, list[Record]], object]
_JOB: dict = {}  # a worker process's (path, work, context), set once by _start_worker


def map_chunks(path: str | Path, chunks: Iterable[Chunk], work: Work, context,
               workers: int) -> Iterator[tuple[Chunk, object]]:
    """(chunk, work(context, records)) for every chunk, in file order, from `workers` processes (forked: they
    inherit `context`, a tokenizer say); with one worker or one chunk, in this process. At most IN_FLIGHT
    chunks per worker are out at once, so memory stays flat. A syntax error that ends a JSON list is raised
    once the records before it have been delivered."""
    job, chunks = (Path(path), work, context), iter(chunks)
    head = list(itertools.islice(chunks, 2))
    if workers < 2 or len(head) < 2:
        results = ((chunk, _process(job, chunk)) for chunk in itertools.chain(head, chunks))
        yield from _deliver(results)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _start_worker, job) as pool:
        yield from _deliver(_bounded(pool, itertools.chain(head, chunks), IN_FLIGHT * workers))


def _start_worker(*job) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no threads on top
    _JOB["job"] = job


def _run(chunk: Chunk):
    return _process(_JOB["job"], chunk)


def _process(job: tuple, chunk: Chunk) -> tuple[object, JSONSyntaxError | None]:
    """(work's result on the chunk's records, the error that ended the list in it); runs in a worker."""
    path, work, context = job
    records, error = read_chunk(path, chunk)
    return work(context, records), error


def _bounded(pool, chunks: Iterator[Chunk], limit: int):
    """(chunk, result) in order, with at most `limit` chunks handed to the pool and not yet read back."""
    pending = deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_run, (chunk,))))
        if len(pending) >= limit:
            chunk, result = pending.popleft()
            yield chunk, result.get()
    while pending:
        chunk, result = pending.popleft()
        yield chunk, result.get()


def _deliver(results) -> Iterator[tuple[Chunk, object]]:
    for chunk, (result, error) in results:
        yield chunk, result
        if error is not None:
            raise error
