"""Reading LLaVA JSON / JSONL records and normalising one record into a `Sample`.

Normalisation follows XTuner's `llava_map_fn`: leading assistant messages are skipped, every `<image>` in
a human message is moved to its front as `<image>\\n`, and consecutive human messages before an answer are
joined. Anything else a real dataset gets wrong raises `RecordError(kind, detail)`; the training loader
skips and counts such records, `vlmtune data check` reports them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def read_records(path: str | Path) -> Iterator[dict]:
    """Yield the raw records of a `.json` list or a `.jsonl` file; syntax errors name file, line, column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check `data_path` in the config")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _loads(line, path, lineno)
        return
    with path.open(encoding="utf-8") as f:
        data = _loads(f.read(), path, 0)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from data


def _loads(text: str, path: Path, lineno: int):
    """json.loads with an error that says where the file is broken."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = lineno or e.lineno
        raise UserError(f"{path}: invalid JSON at line {line} column {e.colno}: {e.msg}") from None


def normalize_record(raw, index: int) -> Sample:
    """Validate one raw record and return its Sample; raise RecordError naming what is wrong."""
    if not isinstance(raw, dict):
        raise RecordError("not_an_object", f"record is a {type(raw).__name__}, not an object")
    images = _images(raw.get("image"))
    messages = raw.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise RecordError("missing_conversations", "`conversations` is missing or not a non-empty list")
    system, turns = _turns(messages)
    n_tokens = sum(user.count(DEFAULT_IMAGE_TOKEN) + answer.count(DEFAULT_IMAGE_TOKEN) for user, answer in turns)
    if images and n_tokens == 0:
        raise RecordError("image_token_missing", "`image` is set but no human turn contains <image>")
    if n_tokens > len(images):
        kind = "image_token_without_image" if not images else "too_many_image_tokens"
        raise RecordError(kind, f"{n_tokens} <image> token(s) for {len(images)} image(s)")
    if n_tokens < len(images):
        raise RecordError("too_few_image_tokens", f"{len(images)} image(s) but {n_tokens} <image> token(s)")
    record_id = raw.get("id")
    return Sample(id=str(index) if record_id is None else str(record_id), images=images, turns=turns, system=system)


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
