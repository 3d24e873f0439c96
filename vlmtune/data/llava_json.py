"""Reading LLaVA JSON / JSONL records and normalising one record into a `Sample`.

Normalisation follows XTuner's `llava_map_fn`: leading assistant messages are skipped and every `<image>` in
a human message is moved to its front as `<image>\\n`. Unlike XTuner, two human (or two assistant) messages
in a row are not silently glued together: XTuner joins human messages without a separator, LLaVA asserts;
we reject the record as `roles_out_of_order` so `data check` shows it. `<image>` inside an answer is rejected
too (XTuner would drop the image and train on the marker). Anything a real dataset gets wrong raises
`RecordError(kind, detail)`; the training loader skips and counts such records, `vlmtune data check`
reports them.
"""
from __future__ import annotations

import contextlib
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.errors import UserError

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


class RecordError(ValueError):
    """A record that cannot be trained on. `kind` is a stable short name used in reports and counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class Sample:
    """One normalised record: image paths (relative to the image folder) and (user, assistant) turns."""

    id: str
    images: list[str]
    turns: list[tuple[str, str]]
    system: str = ""
    # what normalisation changed that the user may not expect: [(kind, detail)], reported by `data check`
    notes: list[tuple[str, str]] = field(default_factory=list)


class JSONSyntaxError(UserError):
    """A data file that is not valid JSON; `line` and `column` are 1-based."""

    def __init__(self, path: Path, line: int, column: int, msg: str):
        super().__init__(f"{path}: invalid JSON at line {line} column {column}: {msg}")
        self.line, self.column, self.msg = line, column, msg


BLOCK_CHARS = 1 << 20  # read a JSON list 1M characters at a time
MAX_RECORD_CHARS = 64 << 20  # a record still unparsable after this many characters is a syntax error


def read_records(path: str | Path) -> Iterator:
    """Yield the raw records of a `.json` list or a `.jsonl` file, streamed; syntax errors name line and column."""
    path = Path(path)
    for line, text in iter_record_texts(path):
        yield parse_record(text, path, line)


def parse_record(text: str, path: Path, line: int):
    """json.loads of one record's text; errors name the file line (JSONL lines, or a record of a list)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONSyntaxError(path, line + e.lineno - 1, e.colno, e.msg) from None


def iter_record_texts(path: str | Path) -> Iterator[tuple[int, str]]:
    """(first line, JSON text) of every record, without holding the file in memory.

    JSONL is split by line (a bad line surfaces when the text is parsed); a JSON list is split with
    `raw_decode` over a rolling buffer, so a syntax error anywhere in it raises JSONSyntaxError here.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check `data_path` in the config")
    try:
        # newline="\n": lines end at "\n" only, as the table build's byte split does (a bare "\r" is no break)
        with path.open(encoding="utf-8-sig", newline="\n") as f:
            if path.suffix == ".jsonl":
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        _not_a_list(line.lstrip()[:1], path)
                        yield lineno, line.rstrip()
            else:
                yield from _split_json_list(f, path)
    except UnicodeDecodeError as e:
        with path.open("rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        fix = "gzip-compressed: unpack it first" if gzipped else f"not UTF-8 text ({e.reason}): convert it to UTF-8"
        raise UserError(f"{path}: {fix}") from None


def _split_json_list(f, path: Path) -> Iterator[tuple[int, str]]:
    """Texts of the elements of the JSON list in file `f`, read block by block."""
    reader = _Blocks(f, path)
    first = reader.next_char()
    if first != "[":
        hint = {"": "the file is empty; ", "{": "found an object (one record per line? name the file .jsonl); "}
        reader.fail(hint.get(first, "") + "expected a JSON list of records (`[` ... `]`)")
    reader.pos += 1
    if reader.next_char() == "]":
        return reader.expect_end()
    while True:
        line, text = reader.line(), reader.element()
        yield line, text
        char = reader.next_char()
        if char == "]":
            return reader.expect_end()
        if char != ",":
            reader.fail("Expecting ',' delimiter or ']' after a record")
        reader.pos += 1
        if reader.next_char() == "]":
            reader.fail("trailing comma before ']'")


class _Blocks:
    """A rolling text buffer over a file: `pos` indexes `buf`; lines are counted incrementally."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.start = 0  # file offset (in characters) of buf[0]
        self.counted, self.lines, self.line_start = 0, 1, 0  # newlines are counted in buf[:counted]

    def line(self, at: int | None = None) -> int:
        """1-based file line of buf[at] (default: the current position); `at` never moves backwards."""
        at = self.pos if at is None else at
        newlines = self.buf.count("\n", self.counted, at)
        if newlines:
            self.lines += newlines
            self.line_start = self.start + self.buf.rfind("\n", self.counted, at) + 1
        self.counted = at
        return self.lines

    def refill(self) -> bool:
        """Drop the consumed text, append the next block; False at end of file."""
        self.line()
        self.start += self.pos
        self.buf, self.counted, self.pos = self.buf[self.pos:], 0, 0
        block = self.f.read(BLOCK_CHARS)
        self.buf += block
        self.eof = not block
        return bool(block)

    def next_char(self) -> str:
        """The next non-whitespace character ('' at end of file), leaving `pos` on it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.refill():
                return ""

    def element(self) -> str:
        """Text of the JSON value at `pos` (moving past it), reading more while it is cut off."""
        while True:
            try:
                _, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # only an error at the buffer's end (or an open string) can be a record cut off by it
                cut_off = e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string")
                if self.eof or not cut_off or len(self.buf) - self.pos > MAX_RECORD_CHARS:
                    self.fail(e.msg, e.pos)
                self.refill()
                continue
            text, self.pos = self.buf[self.pos:end], end
            return text

    def expect_end(self) -> None:
        """Only whitespace may follow the closing bracket."""
        self.pos += 1
        if self.next_char():
            self.fail("extra data after the closing ']'")

    def fail(self, msg: str, at: int | None = None):
        """Raise JSONSyntaxError at buf[at] (default: the current position)."""
        at = self.pos if at is None else at
        line = self.line(at)
        raise JSONSyntaxError(self.path, line, self.start + at - self.line_start + 1, msg)


CHUNK_BYTES = 4 << 20  # records go to the tokenizing workers ~4 MB of JSON at a time
SCAN_BYTES = 16 << 20  # the structure of a JSON list is scanned 16 MB at a time
BACKSLASH, QUOTE, COMMA, OPEN, CLOSE = 0x5C, 0x22, 0x2C, 0x5B, 0x5D


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of a data file holding `count` whole records, the first of them record `first`;
    `line`: the file line `start` is on (JSONL only, where it names a broken line; 0 for a JSON list)."""

    start: int
    end: int
    first: int
    count: int
    line: int = 0


def record_chunks(path: str | Path, chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """Cut a `.json` list or a `.jsonl` file into chunks of whole records, without parsing the records.

    A JSON list is cut at its top-level commas, found by a vectorised scan of the bytes (quotes, backslash
    escapes, bracket depth); the file is memory-mapped, not read into this process. A file that is not a
    well-formed list raises the located JSONSyntaxError/UserError of the streaming reader (`check_syntax`).
    `chunk_bytes` defaults to CHUNK_BYTES.
    """
    path, chunk_bytes = Path(path), chunk_bytes or CHUNK_BYTES
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check `data_path` in the config")
    if path.stat().st_size == 0:  # JSONL: no records; a JSON list: the streaming reader's error
        return None if path.suffix == ".jsonl" else _malformed(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start = 3 if mm[:3] == b"\xef\xbb\xbf" else 0  # a UTF-8 byte order mark, skipped as "utf-8-sig" does
        if path.suffix == ".jsonl":
            _not_a_list(mm[start : start + 4096].lstrip()[:1].decode("latin-1"), path)
            yield from _line_chunks(mm, start, chunk_bytes)
            return None
        well_formed = yield from _list_chunks(np.frombuffer(mm, dtype=np.uint8), start, chunk_bytes)
    if not well_formed:  # raised here, once no view of the map is left
        _malformed(path)


def _not_a_list(first: str, path: Path) -> None:
    """A `.jsonl` file that opens with `[` is a JSON list under the wrong name: every line would be a syntax
    error, so say what it is instead."""
    if first == "[":
        raise UserError(f"{path}: starts with `[`, a JSON list, not one record per line; name the file .json")


def parse_chunk(path: str | Path, chunk: Chunk) -> list:
    """The raw records of `chunk`. In JSONL a line that does not parse is a JSONSyntaxError in the list (one
    bad record, dropped like any other, as `data check` reports it); in a JSON list ValueError is raised
    (the records cannot be located: `check_syntax` then locates the error)."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(chunk.start)
        text = f.read(chunk.end - chunk.start).decode("utf-8")
    if path.suffix == ".jsonl":
        records = [_parse_line(line, path, number) for number, line in enumerate(text.split("\n"), start=chunk.line)
                   if line.strip()]
    else:
        records = json.loads("[" + text + "]")
    if len(records) != chunk.count:
        raise ValueError(f"{path}: bytes {chunk.start}-{chunk.end} hold {len(records)} records, not {chunk.count}")
    return records


def _parse_line(text: str, path: Path, line: int):
    """One JSONL record, or the JSONSyntaxError that names its line."""
    try:
        return parse_record(text, path, line)
    except JSONSyntaxError as e:
        return e


def check_syntax(path: str | Path) -> None:
    """Read the whole file with the streaming reader: raises its located error, if the file has one."""
    for _ in read_records(path):
        pass


def _malformed(path: Path) -> None:
    check_syntax(path)
    raise UserError(f"{path}: expected a JSON list of records (`[` ... `]`)")


def _line_chunks(mm, start: int, chunk_bytes: int) -> Iterator[Chunk]:
    """JSONL: chunks end at a newline; blank lines hold no record."""
    first, line = 0, 1
    while start < len(mm):
        end = mm.find(b"\n", min(start + chunk_bytes, len(mm) - 1))
        end = len(mm) if end < 0 else end + 1
        lines = mm[start:end].split(b"\n")
        count = sum(1 for text in lines if text.strip())
        if count:
            yield Chunk(start, end, first, count, line)
        first, start, line = first + count, end, line + len(lines) - 1


def _list_chunks(buf: np.ndarray, start: int, chunk_bytes: int) -> Iterator[Chunk]:
    """JSON list: runs of consecutive elements of about `chunk_bytes`, cut at the list's top-level commas.
    Returns False when the bytes are not a JSON list."""
    with contextlib.closing(_top_level(buf, start)) as events:  # closed here: it holds views of the map
        opening, char = next(events, (start, None))
        if char != OPEN or not _blank(buf[start:opening]):
            return False
        begin, first, commas = opening + 1, 0, 0  # the chunk being collected: first byte, first record, commas
        for pos, char in events:
            if char == COMMA and pos - begin < chunk_bytes:
                commas += 1
            elif char == COMMA:
                yield Chunk(begin, pos, first, commas + 1)
                begin, first, commas = pos + 1, first + commas + 1, 0
            elif char == CLOSE and _blank(buf[pos + 1 :]):
                if first or commas or not _blank(buf[begin:pos]):  # else: an empty list
                    yield Chunk(begin, pos, first, commas + 1)  # a blank last element (trailing comma) fails to parse
                return True
            else:
                return False
    return False


def _blank(part: np.ndarray) -> bool:
    return not part.tobytes().strip()


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


def normalize_record(raw, index: int) -> Sample:
    """Validate one raw record and return its Sample; raise RecordError naming what is wrong."""
    if not isinstance(raw, dict):
        raise RecordError("not_an_object", f"record is a {type(raw).__name__}, not an object")
    images = _images(raw.get("image"))
    messages = raw.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise RecordError("missing_conversations", "`conversations` is missing or not a non-empty list")
    system, turns = _turns(messages)
    turns, notes = _collapse_repeated_tags(turns, images)
    if any(DEFAULT_IMAGE_TOKEN in answer for _, answer in turns):
        raise RecordError("image_token_in_answer", "an assistant message contains <image>; images belong in human messages")
    n_tokens = sum(user.count(DEFAULT_IMAGE_TOKEN) for user, _ in turns)
    if images and n_tokens == 0:
        raise RecordError("image_token_missing", "`image` is set but no answered human turn contains <image> "
                          "(a last human message without an answer is not trained on)")
    if n_tokens > len(images):
        kind = "image_token_without_image" if not images else "too_many_image_tokens"
        raise RecordError(kind, f"{n_tokens} <image> token(s) for {len(images)} image(s)")
    if n_tokens < len(images):
        raise RecordError("too_few_image_tokens", f"{len(images)} image(s) but {n_tokens} <image> token(s)")
    record_id = str(index) if raw.get("id") is None else str(raw.get("id"))
    for where, text in [("`id`", record_id), *(("`image`", p) for p in images)]:
        check_unicode(text, where)
    return Sample(id=record_id, images=images, turns=turns, system=system, notes=notes)


def _collapse_repeated_tags(turns: list[tuple[str, str]], images: list[str]) -> tuple[list, list[tuple[str, str]]]:
    """A one-image record with several `<image>` in one human turn trains as LLaVA's `preprocess_multimodal`
    and XTuner's `llava_map_fn` make it: every tag of the message removed, one `<image>\n` put in front.
    Tags spread over several turns, or any other count mismatch, stay an error (see `normalize_record`)."""
    counts = [user.count(DEFAULT_IMAGE_TOKEN) for user, _ in turns]
    if len(images) != 1 or sum(counts) < 2 or sum(1 for c in counts if c) != 1:
        return turns, []
    at = next(i for i, c in enumerate(counts) if c)
    user, answer = turns[at]
    collapsed = (DEFAULT_IMAGE_TOKEN + "\n" + user.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
    note = ("image_tokens_collapsed", f"{counts[at]} <image> tags in human turn {at + 1} for one image: trained "
            "with one, as LLaVA and XTuner do")
    return [*turns[:at], (collapsed, answer), *turns[at + 1:]], [note]


def check_unicode(text: str, where: str) -> None:
    """RecordError for text JSON can hold but Unicode cannot: a lone surrogate escape (`\\ud800`), which
    scraped data sometimes has and which the tokenizer, Arrow and UTF-8 files all refuse."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("invalid_unicode", f"{where} holds {text[e.start:e.end]!r} at character {e.start}, "
                          f"a lone surrogate, not a character") from None


def _images(value) -> list[str]:
    """The `image` field as a list of relative paths (absent/None = text-only)."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise RecordError("bad_image_field", f"`image` must be a non-empty path or list of paths, got {value!r}")
    return values


def _turns(messages: list) -> tuple[str, list[tuple[str, str]]]:
    """(system, [(user, assistant), ...]) from LLaVA messages, with `<image>` moved to the front."""
    system, turns, pending = "", [], None
    for pos, msg in enumerate(messages):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise RecordError("bad_message", f"message {pos} needs `from` and `value`")
        role, value = msg["from"], msg["value"]
        if not isinstance(value, str) or not isinstance(role, str):
            raise RecordError("non_string_value", f"message {pos} has a non-string `from`/`value`")
        check_unicode(value, f"message {pos}")
        if role == "system" and pos == 0:
            system = value
        elif role in USER_ROLES:
            if pending is not None:
                raise RecordError("roles_out_of_order", f"message {pos}: two human messages in a row")
            pending = _image_to_front(value)
        elif role in ASSISTANT_ROLES:
            if pending is None and turns:
                raise RecordError("roles_out_of_order", f"message {pos}: two assistant messages in a row")
            if pending is not None:  # a leading assistant message is skipped, as XTuner does
                turns.append((pending, value))
            pending = None
        else:
            raise RecordError("unknown_role", f"message {pos} has role {role!r}; use human/gpt (or user/assistant)")
    if not turns:
        raise RecordError("no_assistant_turn", "no human message is followed by an assistant answer")
    return system, turns


def _image_to_front(text: str) -> str:
    """LLaVA's rule: `<image>` markers go to the front of the message, each followed by a newline."""
    n = text.count(DEFAULT_IMAGE_TOKEN)
    if n == 0:
        return text
    rest = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return ((DEFAULT_IMAGE_TOKEN + "\n") * n + rest).strip()
