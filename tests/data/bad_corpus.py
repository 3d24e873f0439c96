"""Builds a LLaVA dataset with every problem `vlmtune data check` knows about, next to good records.

`build_corpus(root)` writes real photos (scikit-image's sample data) in many formats and modes, broken and
hostile files, and one record per case into root/data.json; `Case.blocking` is the reason check must give
(None for a good record) and `Case.warnings` the warnings it must give, nothing more. Long texts assume a
check with max_length=MAX_LENGTH and 576 tokens per image. `build_broken_files(root)` writes a JSON list
and a JSONL file with a syntax error at known places; `corpus_as_jsonl(corpus)` the corpus as JSONL.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MAX_LENGTH = 2048
LONG = "word " * 2500  # > MAX_LENGTH tokens for any tokenizer: at least one token per word


@dataclass
class Case:
    """One record and what `data check` must say about it."""

    record: object
    blocking: str | None = None
    warnings: set[str] = field(default_factory=set)


@dataclass
class Corpus:
    data_json: Path
    image_folder: Path
    cases: list[Case]

    @property
    def good(self) -> list[int]:
        """Indices of the records with no blocking problem."""
        return [i for i, c in enumerate(self.cases) if c.blocking is None]


def photo(name: str, size: int = 160) -> Image.Image:
    """A real photo from scikit-image, resized so its longer side is `size` px."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((size, size))
    return image


def bomb_png(path: Path, side: int = 30000) -> None:
    """A small PNG whose header claims side x side pixels: Pillow's decompression-bomb guard must refuse it."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    raw[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(raw))


def write_images(folder: Path, outside: Path) -> None:
    """Every image file the cases refer to."""
    folder.mkdir(parents=True)
    photo("astronaut").save(folder / "rgb.jpg", quality=90)
    photo("camera").save(folder / "gray.png")
    rgba = photo("astronaut").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    photo("coffee").convert("CMYK").save(folder / "cmyk.jpg")
    photo("chelsea").quantize(64).save(folder / "palette.png")
    Image.fromarray(np.asarray(photo("camera"), dtype=np.uint16) * 257).save(folder / "sixteen.png")
    photo("rocket").save(folder / "gif_named.jpg", format="GIF")
    photo("coffee").save(folder / "png_named.jpg", format="PNG")
    photo("astronaut", 512).crop((0, 200, 512, 230)).save(folder / "wide.jpg")  # 512x30: aspect 17
    photo("chelsea").resize((10, 12)).save(folder / "tiny.png")
    (folder / "empty.jpg").write_bytes(b"")
    good_jpeg = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    bomb_png(folder / "bomb.png")
    outside.mkdir(parents=True)
    photo("chelsea").save(outside / "cat.jpg")
    os.symlink(outside, folder / "linked")  # a user's symlink inside the image folder is fine


def turns(*pairs: str, roles=("human", "gpt")) -> list[dict]:
    """LLaVA messages alternating `roles`."""
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(pairs)]


def q(text: str = "What is in the picture?") -> str:
    return "<image>\n" + text


def cases(outside_file: Path) -> list[Case]:
    """The records, good ones first, then one per blocking kind."""
    answer = "A photo."
    good = [
        Case({"id": "rgb", "image": "rgb.jpg", "conversations": turns(q(), "An astronaut.")}),
        Case({"id": "multi-turn", "image": "rgb.jpg", "conversations": turns(
            q(), "An astronaut.", "What colour is the suit?", "White.", "Is it indoors?", "Yes.")}),
        Case({"id": "text-only", "conversations": turns("Name a primary colour.", "Red.")}),
        Case({"id": "unicode", "image": "rgb.jpg", "conversations": turns(q("图里有什么？🚀"), "一位宇航员。😊")}),
        Case({"id": "gray", "image": "gray.png", "conversations": turns(q(), answer)}),
        Case({"id": "rgba", "image": "rgba.png", "conversations": turns(q(), answer)}),
        Case({"id": "cmyk", "image": "cmyk.jpg", "conversations": turns(q(), answer)}, None, {"image_mode_converted"}),
        Case({"id": "palette", "image": "palette.png", "conversations": turns(q(), answer)}, None, {"image_mode_converted"}),
        Case({"id": "16-bit", "image": "sixteen.png", "conversations": turns(q(), answer)}, None, {"image_mode_converted"}),
        Case({"id": "gif-as-jpg", "image": "gif_named.jpg", "conversations": turns(q(), answer)},
             None, {"image_format_mismatch", "image_mode_converted"}),
        Case({"id": "png-as-jpg", "image": "png_named.jpg", "conversations": turns(q(), answer)}, None, {"image_format_mismatch"}),
        Case({"id": "wide", "image": "wide.jpg", "conversations": turns(q(), answer)}, None, {"image_aspect_extreme"}),
        Case({"id": "tiny", "image": "tiny.png", "conversations": turns(q(), answer)}, None, {"image_tiny"}),
        Case({"id": "system", "image": "rgb.jpg", "conversations": [{"from": "system", "value": "Be brief."}]
              + turns(q(), answer)}),
        Case({"id": "user-assistant", "image": "gray.png", "conversations": turns(q(), answer, roles=("user", "assistant"))}),
        Case({"id": "leading-gpt", "conversations": [{"from": "gpt", "value": "Hello! Ask me."}]  # skipped, as XTuner
              + turns("Name a fruit.", "An apple.")}),
        Case({"id": "two-images", "image": ["rgb.jpg", "gray.png"],
              "conversations": turns("<image>\n<image>\nWhich one is grey?", "The second.")}),
        Case({"id": "repeated-tag", "image": "rgb.jpg", "conversations": turns("<image> What? <image>", answer)},
             None, {"image_tokens_collapsed"}),  # one image, two tags in one turn: collapsed as LLaVA/XTuner do
        Case({"id": "image-after-text", "image": "rgb.jpg", "conversations": turns("Describe this: <image>", answer)}),
        Case({"id": "symlinked-folder", "image": "linked/cat.jpg", "conversations": turns(q(), "A cat.")}),
        Case({"id": 12345, "image": "rgb.jpg", "conversations": turns(q(), "An integer id.")}),
        Case({"id": "long-answer", "image": "rgb.jpg", "conversations": turns(q(), LONG)}, None, {"exceeds_max_length"}),
        Case({"id": "surrogate-in-metadata", "source": "scraped \ud83d", "conversations": turns("Name a fruit.", "A pear.")}),
    ]
    bad = [
        Case({"id": "b-missing", "image": "nope/missing.jpg", "conversations": turns(q(), answer)}, "image_missing"),
        Case({"id": "b-empty", "image": "empty.jpg", "conversations": turns(q(), answer)}, "image_empty"),
        Case({"id": "b-truncated", "image": "truncated.jpg", "conversations": turns(q(), answer)}, "image_undecodable"),
        Case({"id": "b-garbage", "image": "garbage.jpg", "conversations": turns(q(), answer)}, "image_undecodable"),
        Case({"id": "b-bomb", "image": "bomb.png", "conversations": turns(q(), answer)}, "image_too_large"),
        Case({"id": "b-dotdot", "image": "../outside/cat.jpg", "conversations": turns(q(), answer)}, "image_path_escapes"),
        Case({"id": "b-absolute", "image": str(outside_file), "conversations": turns(q(), answer)}, "image_path_escapes"),
        Case({"id": "b-no-conversations", "image": "rgb.jpg"}, "missing_conversations"),
        Case({"id": "b-empty-conversations", "conversations": []}, "missing_conversations"),
        Case({"id": "b-non-string", "conversations": turns("How many?", 42)}, "non_string_value"),
        Case({"id": "b-surrogate", "conversations": turns("Emoji cut in half: \ud83d?", answer)}, "invalid_unicode"),
        Case({"id": "b-unknown-role", "conversations": turns("Hi", "Hello", roles=("human", "bot"))}, "unknown_role"),
        Case({"id": "b-out-of-order", "conversations": [{"from": "human", "value": "Hi"}] + turns("Again", "Hello")}, "roles_out_of_order"),
        Case({"id": "b-no-answer", "image": "rgb.jpg", "conversations": turns(q())}, "no_assistant_turn"),
        Case({"id": "b-token-missing", "image": "rgb.jpg", "conversations": turns("What is it?", answer)}, "image_token_missing"),
        Case({"id": "b-token-no-image", "conversations": turns(q(), answer)}, "image_token_without_image"),
        Case({"id": "b-two-tokens", "image": "rgb.jpg", "conversations": turns(q(), answer, q("And now?"), answer)},
             "too_many_image_tokens"),  # one image, a tag in each of two turns: LLaVA would feed it twice
        Case({"id": "b-two-images", "image": ["rgb.jpg", "gray.png"], "conversations": turns(q(), answer)}, "too_few_image_tokens"),
        Case({"id": "b-prompt-too-long", "image": "rgb.jpg", "conversations": turns(q(LONG), answer)}, "no_trainable_tokens"),
        Case("just a string", "not_an_object"),
        Case({"id": "b-image-field", "image": 7, "conversations": turns(q(), answer)}, "bad_image_field"),
        Case({"id": "b-message", "conversations": [{"from": "human"}, {"from": "gpt", "value": answer}]}, "bad_message"),
    ]
    return good + bad


def build_corpus(root: Path) -> Corpus:
    """Images under root/images, records in root/data.json (indented, as LLaVA ships its JSON)."""
    folder = root / "images"
    write_images(folder, root / "outside")
    all_cases = cases(root / "outside" / "cat.jpg")
    data_json = root / "data.json"
    text = json.dumps([c.record for c in all_cases], indent=1, ensure_ascii=False)
    data_json.write_text(text.replace("\ud83d", "\\ud83d"), encoding="utf-8")  # a lone surrogate as its JSON escape
    return Corpus(data_json, folder, all_cases)


def build_broken_files(root: Path) -> dict:
    """A JSON list whose 3rd record lacks its separating comma, and a JSONL file with one broken line.

    Returns {"json": (path, line, column), "jsonl": (path, bad line number, number of good lines)}."""
    record = {"id": "ok", "conversations": turns("Hi", "Hello")}
    text = "[\n" + ",\n".join(json.dumps(dict(record, id=f"r{i}")) for i in range(2)) + "\n"
    text += json.dumps(dict(record, id="r2")) + "\n]\n"  # the comma after r1 is missing
    broken_json = root / "broken.json"
    broken_json.write_text(text)
    lines = [json.dumps(dict(record, id=f"l{i}")) for i in range(4)]
    lines[2] = lines[2][:-5]  # cut off: not valid JSON
    broken_jsonl = root / "broken.jsonl"
    broken_jsonl.write_text("\n".join(lines) + "\n")
    return {"json": (broken_json, 4, 1), "jsonl": (broken_jsonl, 3, 3)}


def corpus_as_jsonl(corpus: Corpus) -> Path:
    """The corpus's records one per line in data.jsonl, as JSONL files come: CRLF line ends on some lines, a
    blank line (so a record's line is not its index + 1) and a last line cut off, a `json_syntax` record
    (index len(corpus.cases))."""
    lines = [json.dumps(c.record, ensure_ascii=False).replace("\ud83d", "\\ud83d") for c in corpus.cases]
    lines = [line + ("\r" if i % 3 == 0 else "") for i, line in enumerate(lines)]
    lines.insert(5, "  ")
    lines.append(json.dumps(corpus.cases[0].record)[:-7])
    path = corpus.data_json.with_suffix(".jsonl")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
