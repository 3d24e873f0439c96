"""Normalising one LLaVA record into a `Sample` (reading the files: data/reader.py).

Normalisation follows XTuner's `llava_map_fn`: leading assistant messages are skipped, and the `<image>` of a
human message with one is moved to its front as `<image>\\n`. A message with two or more tags keeps them where
they are (interleaved images, LLaVA-NeXT's rule: `place_image_tags`), unless the record has one image, whose
repeated tags collapse to one in front, as LLaVA-1.5 and XTuner do. Unlike XTuner, two human (or two assistant) messages
in a row are not silently glued together: XTuner joins human messages without a separator, LLaVA asserts;
we reject the record as `roles_out_of_order` so `data check` shows it. `<image>` inside an answer is rejected
too (XTuner would drop the image and train on the marker). Anything a real dataset gets wrong raises
`RecordError(kind, detail)`; the training loader skips and counts such records, `vlmtune data check`
reports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.constants import DEFAULT_IMAGE_TOKEN

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
    """(system, [(user, assistant), ...]) from LLaVA messages, `<image>` tags placed (`place_image_tags`)."""
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
            pending = place_image_tags(value)
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


def place_image_tags(text: str) -> str:
    """Where a human message's `<image>` tags go: one tag moves to the front as `<image>\\n` (LLaVA-1.5 and
    XTuner: the text stripped around it); two or more stay where they are, so text and images interleave as
    written (LLaVA-NeXT-Interleave / OneVision data). Chat places the tags of its images by this rule too."""
    if text.count(DEFAULT_IMAGE_TOKEN) != 1:
        return text
    return (DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
