"""One reader for LLaVA data files: `data check` and the table build frame and map records through it alike.

Three steps, each in one place:
- `record_chunks` (main process) cuts a `.json` list or a `.jsonl` file into chunks of whole records with a
  vectorised byte scan of the memory-mapped file: nothing is parsed or copied, so memory stays flat;
- `read_chunk` (wherever the chunk is processed) frames a chunk into `Record`s: index, file line, the exact
  text and the parsed value. It alone decides what is a record and what is a syntax error;
- `map_chunks` runs `work(context, records)` on every chunk in worker processes, bounded, in file order.

So both commands see the same records, indices and lines, and fail the same way:
- a JSONL line that does not parse is one record whose value is its JSONSyntaxError (reported, dropped);
- a syntax error in a JSON list ends the reading: the records before it are delivered, then the
  JSONSyntaxError naming line and column is raised (the records after it cannot be located);
- a byte order mark is skipped; an empty `.jsonl` has no records, an empty `.json` is an error;
- a gzip-compressed or non-UTF-8 file, or a JSON list named `.jsonl`, is a one-line UserError.
"""
from __future__ import annotations

import codecs
import json
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vlmtune.errors import UserError

CHUNK_BYTES = 4 << 20  # the table build hands records to its workers ~4 MB of JSON at a time
SCAN_BYTES = 1 << 20  # a JSON list's structure is scanned 1 MB at a time (faster than 16 MB; a few MB of temporaries)
MAX_RECORD_BYTES = 64 << 20  # past a malformed list's last good record, at most this much is read to locate the error
SPACE, SPACE_BYTES = " \t\r\n", b" \t\r\n"  # JSON's whitespace: nothing else pads a list or makes a line blank
BACKSLASH, QUOTE, COMMA, OPEN, CLOSE, NEWLINE = 0x5C, 0x22, 0x2C, 0x5B, 0x5D, 0x0A
_SPACES = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()


class JSONSyntaxError(UserError):
    """A data file that is not valid JSON; `line` and `column` are 1-based, `detail` is what reports show."""

    def __init__(self, path: Path, line: int, column: int, msg: str):
        self.path, self.line, self.column, self.msg = path, line, column, msg
        self.detail = f"line {line} column {column}: {msg}"
        super().__init__(f"{path}: invalid JSON at {self.detail}")

    def __reduce__(self):  # rebuilt from its fields when a worker process sends it back
        return type(self), (self.path, self.line, self.column, self.msg)


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of a data file holding `count` whole records, the first of them record `first`.
    `line`: the file line `start` is on, which begins at byte `line_start` (for an error's column). In a JSON
    list the first chunk holds the opening `[` and the `last` one the closing `]`; `count` None: the list is
    malformed from `start` on, and reading the chunk locates the error."""

    start: int
    end: int
    first: int
    count: int | None
    line: int = 1
    line_start: int = 0
    last: bool = False


class Record(NamedTuple):
    """One record as written: index in the file, first line, exact text, parsed value (for a JSONL line that
    does not parse: its JSONSyntaxError)."""

    index: int
    line: int
    text: str
    value: object


def record_chunks(path: str | Path, chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """Cut a `.json` list or a `.jsonl` file into chunks of about `chunk_bytes` (default CHUNK_BYTES) of whole
    records, without parsing them. A JSON list is cut at its top-level commas, found by scanning the bytes
    (quotes, backslash escapes, bracket depth); where the scan finds no well-formed list, the rest of the file
    is one last chunk, whose reading raises the located error."""
    path, chunk_bytes = Path(path), chunk_bytes or CHUNK_BYTES
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check `data_path` in the config")
    if path.stat().st_size == 0:  # JSONL: no records; a JSON list: reading the empty chunk says it is empty
        if path.suffix != ".jsonl":
            yield Chunk(0, 0, 0, None, last=True)
        return
    with path.open("rb") as f:  # the map is never closed by hand: it goes with the last view of it
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if mm[:2] == b"\x1f\x8b":
        raise UserError(f"{path}: gzip-compressed: unpack it first")
    start = 3 if mm[:3] == b"\xef\xbb\xbf" else 0  # a UTF-8 byte order mark, skipped as "utf-8-sig" does
    if path.suffix == ".jsonl":
        _not_a_list(mm[start : start + 4096].lstrip(SPACE_BYTES)[:1], path)
        yield from _line_chunks(mm, start, chunk_bytes)
    else:
        yield from _list_chunks(mm, start, chunk_bytes)


def _not_a_list(first: bytes, path: Path) -> None:
    """A `.jsonl` file that opens with `[` is a JSON list under the wrong name: every line would be a syntax
    error, so say what it is instead."""
    if first == b"[":
        raise UserError(f"{path}: starts with `[`, a JSON list, not one record per line; name the file .json")


def _line_chunks(mm: mmap.mmap, start: int, chunk_bytes: int) -> Iterator[Chunk]:
    """JSONL: chunks end at a newline ("\\n" only: a bare "\\r" is no break); blank lines hold no record."""
    first, line = 0, 1
    while start < len(mm):
        end = mm.find(b"\n", min(start + chunk_bytes, len(mm) - 1))
        end = len(mm) if end < 0 else end + 1
        lines = mm[start:end].split(b"\n")
        count = sum(1 for text in lines if text.strip(SPACE_BYTES))
        if count:
            yield Chunk(start, end, first, count, line, start)
        first, start, line = first + count, end, line + len(lines) - 1


def _list_chunks(mm: mmap.mmap, start: int, chunk_bytes: int) -> Iterator[Chunk]:
    """JSON list: runs of consecutive elements of about `chunk_bytes`, cut at the list's top-level commas;
    the first run starts at the file's start, the last ends after the closing bracket."""
    buf, lines = np.frombuffer(mm, dtype=np.uint8), _Lines(mm, start)
    begin, first, commas = start, 0, 0  # the chunk being collected: first byte, first record, commas in it
    events = _top_level(buf, start)
    opening, char = next(events, (len(buf), None))
    if char == OPEN and _blank(buf[start:opening]):
        for pos, char in events:
            if char == COMMA and pos - begin < chunk_bytes:
                commas += 1
            elif char == COMMA:
                yield Chunk(begin, pos, first, commas + 1, *lines.at(begin))
                begin, first, commas = pos + 1, first + commas + 1, 0
            elif char == CLOSE and _blank(buf[pos + 1 :]):
                if first or commas or not _blank(buf[opening + 1 : pos]):  # else: an empty list, no records
                    yield Chunk(begin, pos + 1, first, commas + 1, *lines.at(begin), last=True)
                return
            else:
                break
    end = min(len(buf), begin + chunk_bytes + MAX_RECORD_BYTES)
    yield Chunk(begin, end, first, None, *lines.at(begin), last=True)


class _Lines:
    """Line number and line start of byte offsets asked for in increasing order, counted incrementally."""

    def __init__(self, mm: mmap.mmap, start: int):
        self.mm, self.buf = mm, np.frombuffer(mm, dtype=np.uint8)
        self.pos, self.line, self.line_start = start, 1, start

    def at(self, pos: int) -> tuple[int, int]:
        newlines = int(np.count_nonzero(self.buf[self.pos : pos] == NEWLINE))
        if newlines:
            self.line += newlines
            self.line_start = self.mm.rfind(b"\n", self.pos, pos) + 1
        self.pos = pos
        return self.line, self.line_start


def _blank(part: np.ndarray) -> bool:
    """Only JSON whitespace in `part`, looked at block by block (it may be the rest of a large file)."""
    return all(not part[i : i + SCAN_BYTES].tobytes().strip(SPACE_BYTES) for i in range(0, len(part), SCAN_BYTES))


def _top_level(buf: np.ndarray, start: int) -> Iterator[tuple[int, int]]:
    """(position, byte) of the structural characters outside strings at depth 0, and of the commas and the
    closing bracket at depth 1: for a JSON list, its brackets and the commas between its elements."""
    in_string, depth = 0, 0
    while start < len(buf):
        end = min(start + SCAN_BYTES, len(buf))
        while end < len(buf) and buf[end - 1] == BACKSLASH:  # a block never starts inside a backslash run
            end += 1
        block = buf[start:end]
        quotes = np.flatnonzero(block == QUOTE)
        quotes = quotes[~_escaped(block, quotes)]
        folded = block | 0x20  # [ and { fold to 0x7B, ] and } to 0x7D
        marks = np.flatnonzero((folded == 0x7B) | (folded == 0x7D) | (block == COMMA))
        marks = marks[(np.searchsorted(quotes, marks) + in_string) % 2 == 0]  # outside strings
        chars = block[marks]
        step = np.isin(chars, (OPEN, 0x7B)).astype(np.int64) - np.isin(chars, (CLOSE, 0x7D))
        after = depth + np.cumsum(step)
        before = after - step
        top = (before == 0) | ((before == 1) & ((chars == COMMA) | (after == 0)))
        yield from zip((marks[top] + start).tolist(), chars[top].tolist())
        in_string = (in_string + len(quotes)) % 2
        depth = int(after[-1]) if len(after) else depth
        start = end


def _escaped(block: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """Which of the quote positions are escaped: preceded by an odd run of backslashes."""
    escaped = np.zeros(len(quotes), dtype=bool)
    prev = quotes - 1
    candidates = np.flatnonzero((prev >= 0) & (block[np.maximum(prev, 0)] == BACKSLASH))
    if len(candidates):
        slashes = np.flatnonzero(block == BACKSLASH)
        run_first = np.concatenate([[True], np.diff(slashes) != 1])
        run_start = slashes[np.maximum.accumulate(np.where(run_first, np.arange(len(slashes)), 0))]
        at = prev[candidates]
        escaped[candidates] = (at - run_start[np.searchsorted(slashes, at)] + 1) % 2 == 1
    return escaped


def read_chunk(path: str | Path, chunk: Chunk) -> tuple[list[Record], JSONSyntaxError | None]:
    """The records of `chunk`, and the syntax error that ends a JSON list inside it (None if none: then the
    records are all `chunk.count` of them; else the ones before the error)."""
    path = Path(path)
    text = _chunk_text(path, chunk)
    if path.suffix == ".jsonl":
        records, error = _jsonl_records(path, chunk, text), None
    else:
        records, error = [], None
        try:
            _list_records(path, chunk, text, records)
        except JSONSyntaxError as e:
            error = e
    if error is None and len(records) != chunk.count:  # the scan and the framing disagree: a bug
        raise RuntimeError(f"{path}: bytes {chunk.start}-{chunk.end} hold {len(records)} records, not {chunk.count}")
    return records, error


def _chunk_text(path: Path, chunk: Chunk) -> str:
    """The chunk's bytes as text. Chunks end at a comma, newline or bracket, never inside a character, except
    a malformed list's rest cut at MAX_RECORD_BYTES: there a cut character is left out."""
    with path.open("rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
        final = chunk.end >= os.fstat(f.fileno()).st_size or chunk.count is not None
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}): convert it to UTF-8") from None


def _jsonl_records(path: Path, chunk: Chunk, text: str) -> list[Record]:
    """One record per non-blank line, its text without the line end; a line that does not parse is a record
    whose value is the JSONSyntaxError naming its line."""
    records = []
    for line, part in enumerate(text.split("\n"), start=chunk.line):
        part = part.rstrip(SPACE)
        if part:
            try:
                value = json.loads(part)
            except json.JSONDecodeError as e:
                value = JSONSyntaxError(path, line, e.colno, e.msg)
            records.append(Record(chunk.first + len(records), line, part, value))
    return records


def _list_records(path: Path, chunk: Chunk, text: str, records: list[Record]) -> None:
    """Append the elements of a JSON-list chunk to `records`, checking `[ value (, value)* ]` (the first chunk
    holds `[`, the last `]`); JSONSyntaxError at the first place the grammar fails."""
    at = _Where(path, chunk, text)
    pos = _space(text, 0)
    if chunk.first == 0:  # the file's start
        hint = {"": "the file is empty; ", "{": "found an object (one record per line? name the file .jsonl); "}
        if text[pos : pos + 1] != "[":
            at.fail(hint.get(text[pos : pos + 1], "") + "expected a JSON list of records (`[` ... `]`)", pos)
        pos = _space(text, pos + 1)
        if text[pos : pos + 1] == "]":
            return _close(text, pos, at)
    while True:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            at.fail(e.msg, e.pos)
        records.append(Record(chunk.first + len(records), at.line(pos), text[pos:end], value))
        pos = _space(text, end)
        if pos == len(text) and not chunk.last:
            return None
        if text[pos : pos + 1] == "]":
            return _close(text, pos, at)
        if text[pos : pos + 1] != ",":
            at.fail("Expecting ',' delimiter or ']' after a record", pos)
        pos = _space(text, pos + 1)
        if text[pos : pos + 1] == "]":
            at.fail("trailing comma before ']'", pos)


def _close(text: str, pos: int, at: _Where) -> None:
    """Only whitespace may follow the closing bracket at `pos` (a chunk with count None has something else
    after it, beyond what was read)."""
    pos = _space(text, pos + 1)
    if pos < len(text) or at.chunk.count is None:
        at.fail("extra data after the closing ']'", pos)


def _space(text: str, pos: int) -> int:
    return _SPACES.match(text, pos).end()


class _Where:
    """File lines of positions in a chunk's text: counted incrementally for records, from scratch for an error."""

    def __init__(self, path: Path, chunk: Chunk, text: str):
        self.path, self.chunk, self.text = path, chunk, text
        self.pos, self.lines = 0, chunk.line  # lines: the line of text[pos]

    def line(self, pos: int) -> int:
        """Line of text[pos]; `pos` never moves backwards."""
        self.lines += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.lines

    def fail(self, msg: str, pos: int):
        """Raise JSONSyntaxError at text[pos]; on the chunk's first line the column counts the characters
        before the chunk on that line too (read from the file only now)."""
        newline = self.text.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else _chars(self.path, self.chunk.line_start, self.chunk.start) + pos + 1
        raise JSONSyntaxError(self.path, self.chunk.line + self.text.count("\n", 0, pos), column, msg)


def _chars(path: Path, start: int, end: int) -> int:
    """UTF-8 characters in bytes [start, end) of the file (every byte but a continuation byte starts one)."""
    count = 0
    with path.open("rb") as f:
        f.seek(start)
        for offset in range(start, end, SCAN_BYTES):
            block = np.frombuffer(f.read(min(SCAN_BYTES, end - offset)), dtype=np.uint8)
            count += len(block) - int(np.count_nonzero((block & 0xC0) == 0x80))
    return count


def read_records(path: str | Path) -> Iterator:
    """The parsed records of a data file, in order, read here chunk by chunk; the first syntax error (a broken
    JSONL line too) is raised."""
    for chunk in record_chunks(path):
        for value in parse_chunk(path, chunk):
            if isinstance(value, JSONSyntaxError):
                raise value
            yield value


def parse_chunk(path: str | Path, chunk: Chunk) -> list:
    """The parsed records of `chunk` (a broken JSONL line: its JSONSyntaxError); a JSON list's error is raised."""
    records, error = read_chunk(path, chunk)
    if error is not None:
        raise error
    return [record.value for record in records]
