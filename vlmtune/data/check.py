"""`vlmtune data check`: every problem in a LLaVA dataset, found before a 20-hour run trips over it.

The file is read by the reader the table build uses (data/reader.py: the same records, indices, lines and
syntax errors; a 665K-record JSON list is never one Python object), and chunks of ~64 KB of records are
checked in worker processes with the rules training itself applies: `normalize_record` (format),
`resolve_image_path` + `load_image` (images, fully decoded), `tokenize_conversation` + `truncate` (length,
image tokens counted). A problem is

- blocking: training would drop the record (at build time) or replace it (when its image fails to load);
- a warning: the record trains, perhaps not as intended (converted modes, odd shapes, truncation).

Output: a summary on the console, a JSON report (counts, first examples, all record indices per kind, token
statistics) and optionally the good records, streamed to a new file. Exit code 1 when anything blocks.
"""
from __future__ import annotations

import json
import os
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtune.data.image import load_image, resolve_image_path
from vlmtune.data.llava_json import RecordError, normalize_record
from vlmtune.data.reader import JSONSyntaxError, Record, record_chunks
from vlmtune.data.workers import map_chunks
from vlmtune.errors import UserError

# kind -> what to do about it. Kinds come from llava_json.py / image.py (one rule with training) and from here.
BLOCKING = {
    "json_syntax": "fix the JSON at the reported line and column",
    "not_an_object": "every record must be a JSON object",
    "missing_conversations": "add a non-empty `conversations` list",
    "bad_message": "every message needs `from` and `value`",
    "non_string_value": "`from` and `value` must be strings",
    "invalid_unicode": "replace the lone surrogate escapes (\\ud800-\\udfff) with real characters or drop them",
    "unknown_role": "use human/gpt (or user/assistant); `system` only as the first message",
    "roles_out_of_order": "alternate human and gpt messages",
    "no_assistant_turn": "add a gpt answer after the human message",
    "bad_image_field": "`image` must be a relative path or a list of them",
    "image_token_missing": "put <image> in the first human message",
    "image_token_without_image": "remove <image> or set `image`",
    "too_many_image_tokens": "one <image> per image",
    "too_few_image_tokens": "one <image> per image",
    "image_token_in_answer": "move <image> into a human message",
    "image_path_escapes": "image paths must stay inside --image-folder (or list the root in allowed_image_roots)",
    "image_missing": "download the image or drop the record",
    "image_empty": "re-download the image",
    "image_undecodable": "re-download or re-encode the image",
    "image_too_large": "downscale the image (Pillow's decompression-bomb limit)",
    "no_trainable_tokens": "shorten the prompt or raise max_length: nothing is left to train on",
}
WARNINGS = {
    "image_format_mismatch": "trains after conversion; `vlmtune data prepare` re-encodes OCR-VQA as JPEG",
    "image_mode_converted": "converted to RGB when loaded (16-bit is scaled, alpha dropped)",
    "image_aspect_extreme": "mostly padding (pad-to-square) or a huge resize; consider cropping",
    "image_tiny": "upscaled a lot; little detail left",
    "image_tokens_collapsed": "one <image> per image; the extra tags in that message are dropped, as LLaVA/XTuner do",
    "exceeds_max_length": "truncated to max_length; the end of the conversation is not trained on",
}
EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
                     ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
PLAIN_MODES = {"RGB", "L", "RGBA"}
MAX_ASPECT = 10.0  # longer side / shorter side
MIN_SIDE = 16  # pixels on the shorter side
MAX_EXAMPLES = 5
CHUNK_BYTES = 64 << 10  # a worker task: ~64 KB of JSON, some 30-60 LLaVA records


@dataclass
class Settings:
    """What a worker needs to check a record; tokenizer None = no token statistics."""

    data_path: str
    image_folder: str
    allowed_roots: tuple[str, ...] = ()
    tokenizer: object = None
    template: object = None
    max_length: int = 2048
    image_length: int | None = None  # tokens per image, from the encoder's config (needed with a tokenizer)
    system: str = ""
    anyres: object = None  # model/anyres.py AnyRes: each image counts the tokens of its own size


@dataclass
class Verdict:
    """One record's outcome: the blocking problem (first found) or None, warnings, full token length."""

    index: int
    line: int
    id: str | None
    problem: tuple[str, str, str | None] | None = None  # (kind, detail, image path)
    warnings: list[tuple[str, str, str | None]] = field(default_factory=list)
    length: int | None = None
    text: str | None = None  # the record as written, sent back when it has no problem (for --write-clean)


def check_records(settings: Settings, records: list[Record]) -> list[Verdict]:
    """Verdicts on a chunk's records: what a worker runs."""
    return [check_record(settings, record) for record in records]


def check_record(settings: Settings, record: Record) -> Verdict:
    """Apply every rule to one record; a good record's verdict carries its text."""
    verdict, image, raw = Verdict(record.index, record.line, None), None, record.value  # image: the path being checked
    if isinstance(raw, JSONSyntaxError):  # a JSONL line that does not parse
        verdict.problem = ("json_syntax", raw.detail, None)
        return verdict
    try:
        verdict.id = None if not isinstance(raw, dict) or raw.get("id") is None else str(raw.get("id"))
        sample = normalize_record(raw, record.index)
        verdict.warnings += [(kind, detail, None) for kind, detail in sample.notes]
        sizes = []
        for image in sample.images:
            path = resolve_image_path(settings.image_folder, image, settings.allowed_roots)
            loaded = load_image(path)
            sizes.append((loaded.height, loaded.width))
            verdict.warnings += [(kind, detail, image) for kind, detail in image_warnings(path)]
        image = None
        if settings.tokenizer is not None:
            _check_tokens(settings, sample, verdict, sizes)
    except RecordError as e:
        verdict.problem = (e.kind, e.detail, image)
    verdict.text = record.text if verdict.problem is None else None
    return verdict


def _check_tokens(settings: Settings, sample, verdict: Verdict, sizes: list[tuple[int, int]]) -> None:
    """Full length with images expanded (each `image_length`, or with AnyRes its own count from its (height,
    width) in `sizes`); blocking when truncation to max_length leaves no label."""
    from vlmtune.data.tokenize import tokenize_conversation, truncate
    from vlmtune.model.anyres import image_positions

    anyres = settings.anyres
    lengths = settings.image_length if anyres is None else image_positions(sizes, settings.image_length, anyres)
    full = tokenize_conversation(sample.turns, settings.tokenizer, settings.template, sys.maxsize,
                                 lengths, sample.system or settings.system)
    verdict.length = full.length
    if not truncate(full.input_ids, full.labels, settings.max_length, lengths).trainable:
        each = f"each image = {settings.image_length} tokens" if settings.anyres is None else f"images = {lengths} tokens"
        raise RecordError("no_trainable_tokens", f"{full.length} tokens; nothing to train on within "
                          f"max_length={settings.max_length} ({each})")
    if full.length > settings.max_length:
        verdict.warnings.append(("exceeds_max_length", f"{full.length} > {settings.max_length} tokens", None))


def image_warnings(path: Path) -> list[tuple[str, str]]:
    """Warnings about an image that loads: content format vs extension, mode, shape (header only)."""
    with Image.open(path) as image:
        fmt, mode, (width, height) = image.format, image.mode, image.size
    out = []
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if expected is not None and fmt != expected:
        out.append(("image_format_mismatch", f"{fmt} content in a {path.suffix} file"))
    if mode not in PLAIN_MODES:
        out.append(("image_mode_converted", f"mode {mode}"))
    if max(width, height) > MAX_ASPECT * min(width, height):
        out.append(("image_aspect_extreme", f"{width}x{height}"))
    if min(width, height) < MIN_SIDE:
        out.append(("image_tiny", f"{width}x{height}"))
    return out


class Tally:
    """Counts, first examples and record indices per kind, plus token lengths."""

    def __init__(self):
        self.records = self.good = self.with_warnings = 0
        self.kinds: dict[str, dict] = {}
        self.lengths = array("q")  # full token length of every tokenized record (8 bytes each)

    def add(self, verdict: Verdict) -> None:
        self.records += 1
        self.good += verdict.problem is None
        self.with_warnings += bool(verdict.warnings)
        if verdict.length is not None:
            self.lengths.append(verdict.length)
        for kind, detail, path in ([verdict.problem] if verdict.problem else []) + verdict.warnings:
            self.add_kind(kind, {"index": verdict.index, "line": verdict.line, "id": verdict.id,
                                 "path": path, "detail": detail})

    def add_kind(self, kind: str, example: dict) -> None:
        """Count one occurrence of `kind` (example: index, line, id, path, detail)."""
        entry = self.kinds.setdefault(kind, {"count": 0, "examples": [], "indices": []})
        entry["count"] += 1
        if entry["indices"][-1:] != [example["index"]]:  # a record with two odd images is listed once
            entry["indices"].append(example["index"])
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(example)

    def section(self, table: dict[str, str]) -> dict:
        """Report entries of the kinds in `table` (BLOCKING or WARNINGS), most frequent first."""
        found = {k: v for k, v in self.kinds.items() if k in table}
        return {k: {"fix": table[k], **v} for k, v in sorted(found.items(), key=lambda kv: -kv[1]["count"])}


def run_check(settings: Settings, workers: int, clean_path: Path | None = None) -> dict:
    """Check every record (in `workers` processes); write the good ones to `clean_path`; return the report."""
    start, tally = time.time(), Tally()
    writer = _CleanWriter(clean_path) if clean_path else None
    try:
        fatal = _check_all(settings, workers, tally, writer)
    except BaseException:  # interrupted or a bug: no half-written clean file is left behind
        if writer:
            writer.close(keep=False)
        raise
    if fatal is not None:  # not a record: reading stopped at this point of the file
        tally.add_kind("json_syntax", {"index": tally.records, "line": fatal.line, "id": None, "path": None,
                                       "detail": fatal.detail})
    if writer:
        writer.close(keep=fatal is None)
    return _report(settings, tally, fatal, time.time() - start, clean_path if fatal is None else None)


def _check_all(settings: Settings, workers: int, tally: Tally, writer: _CleanWriter | None) -> JSONSyntaxError | None:
    """Tally the verdict on every record, in file order, the good ones written by `writer`; the syntax error
    that ended a JSON list (the records after it cannot be located), if any. Progress is shown by bytes."""
    from tqdm import tqdm

    size = Path(settings.data_path).stat().st_size
    chunks = record_chunks(settings.data_path, CHUNK_BYTES)
    with tqdm(total=size, unit="B", unit_scale=True, desc="data check", disable=None) as bar:
        try:
            for chunk, verdicts in map_chunks(settings.data_path, chunks, check_records, settings, workers):
                for verdict in verdicts:
                    tally.add(verdict)
                    if writer and verdict.problem is None:
                        writer.write(verdict.text)
                bar.update(min(chunk.end, size) - bar.n)
        except JSONSyntaxError as e:
            return e
    return None


class _CleanWriter:
    """The good records, streamed to a temporary file and renamed into place when complete."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.jsonl = path.suffix == ".jsonl"
        self.file = self.tmp.open("w", encoding="utf-8")
        self.count = 0
        if not self.jsonl:
            self.file.write("[")

    def write(self, text: str) -> None:
        if self.jsonl:  # a record of a JSON list may span lines: one line each in JSONL
            self.file.write(_one_line(text.strip()) + "\n")
        else:
            self.file.write(("," if self.count else "") + "\n" + text.strip())
        self.count += 1

    def close(self, keep: bool) -> None:
        if not self.jsonl:
            self.file.write("\n]\n")
        self.file.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink()


def _one_line(text: str) -> str:
    """A record's JSON text on one line: as written when it is, else re-serialised; a lone surrogate escape in a
    field no rule reads (`"source": "\\ud83d"`) stays an escape, since UTF-8 cannot hold it."""
    if "\n" not in text and "\r" not in text:
        return text
    record = json.loads(text)
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line


def _report(settings: Settings, tally: Tally, fatal, seconds: float, clean_path: Path | None) -> dict:
    """The machine-readable report."""
    blocking = tally.section(BLOCKING)
    report = {
        "data_path": settings.data_path, "image_folder": settings.image_folder,
        "complete": fatal is None, "records": tally.records, "good": tally.good, "bad": tally.records - tally.good,
        "with_warnings": tally.with_warnings,
        "blocking": blocking, "warnings": tally.section(WARNINGS), "tokens": None,
        "clean_output": str(clean_path) if clean_path else None,
        "seconds": round(seconds, 2), "records_per_second": round(tally.records / max(seconds, 1e-9), 1),
        "exit_code": 1 if blocking else 0,
    }
    if settings.tokenizer is not None:
        lengths = np.asarray(tally.lengths, dtype=np.int64)
        exceed = tally.kinds.get("exceeds_max_length", {}).get("count", 0)
        report["tokens"] = {
            "tokenizer": settings.tokenizer.name_or_path, "prompt_template": settings.template.name,
            "max_length": settings.max_length, "image_length": settings.image_length,
            "anyres_pinpoints": [list(p) for p in settings.anyres.pinpoints] if settings.anyres else None,
            "tokenized": int(lengths.size), "exceed_max_length": exceed + blocking.get("no_trainable_tokens", {}).get("count", 0),
            "no_trainable_tokens": blocking.get("no_trainable_tokens", {}).get("count", 0),
            "length": {name: int(np.percentile(lengths, q)) if lengths.size else 0
                       for name, q in (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "mean_length": round(float(lengths.mean()), 1) if lengths.size else 0.0,
        }
    return report


def print_summary(report: dict, report_path: Path) -> None:
    """A short human-readable table of the report."""
    print(f"{report['records']} records: {report['good']} good, {report['bad']} blocking, "
          f"{report['with_warnings']} with warnings ({report['records_per_second']:.0f} records/s)")
    for title, section in (("BLOCKING", report["blocking"]), ("warning", report["warnings"])):
        for kind, entry in section.items():
            first = entry["examples"][0]
            where = f"record {first['index']} (line {first['line']}, id {first['id']})"
            print(f"  {title:8} {kind:26} {entry['count']:>8}  e.g. {where}: {first['detail']}")
            print(f"  {'':8} {'':26} {'':>8}  -> {entry['fix']}")
    if not report["complete"]:
        print("  the JSON syntax error stopped the check: records after it were not read")
    tokens = report["tokens"]
    if tokens is None:
        print("  token lengths not checked: pass --config, or --tokenizer and --prompt-template")
    else:
        each = f"{tokens['image_length']} each" if tokens["anyres_pinpoints"] is None else \
            f"AnyRes: each its own, at most {tokens['image_length']}"
        print(f"  tokens (images = {each}): p50 {tokens['length']['p50']}, p99 "
              f"{tokens['length']['p99']}, max {tokens['length']['max']}; {tokens['exceed_max_length']} over "
              f"max_length={tokens['max_length']}, {tokens['no_trainable_tokens']} with nothing to train on")
    if report["clean_output"]:
        print(f"  good records written to {report['clean_output']}")
    print(f"  report: {report_path}")


def settings_from_args(args) -> Settings:
    """Settings from the CLI flags; --config supplies tokenizer, template, max_length, system, allowed roots."""
    settings = Settings(data_path=args.data_path, image_folder=args.image_folder, image_length=args.image_length)
    tokenizer_path, template, trust_remote_code = args.tokenizer, args.prompt_template, False
    encoder, strategy, pinpoints = args.visual_encoder, None, None
    if args.config:
        from vlmtune.config import load_config

        cfg = load_config(args.config)
        encoder = encoder or cfg.model.visual_encoder_name_or_path
        tokenizer_path = tokenizer_path or cfg.model.llm_name_or_path
        template = template or cfg.data.prompt_template
        settings.max_length, settings.system = cfg.data.max_length, cfg.data.system
        settings.allowed_roots = tuple(cfg.data.allowed_image_roots)
        trust_remote_code = cfg.model.trust_remote_code
        strategy, pinpoints = cfg.model.vision_feature_select_strategy, cfg.model.image_grid_pinpoints
    if args.max_length is not None:
        settings.max_length = args.max_length
    if bool(tokenizer_path) != bool(template):
        raise UserError("token lengths need both --tokenizer and --prompt-template (or --config)")
    if tokenizer_path:
        from vlmtune.data.templates import get_template
        from vlmtune.model.anyres import image_layout
        from vlmtune.model.build import load_tokenizer
        from vlmtune.model.vision import vision_config

        if settings.image_length is None and encoder is None:
            raise UserError("token lengths count each image as the tokens it becomes: pass --config, --visual-encoder "
                            "(its config.json is read, no weights) or --image-length")
        if pinpoints and settings.image_length is not None:
            raise UserError(f"{args.config} tiles images with AnyRes (image_grid_pinpoints): each image counts the "
                            "tokens of its own size; drop --image-length")
        if settings.image_length is None:
            settings.image_length, settings.anyres = image_layout(vision_config(encoder), strategy, pinpoints)
        settings.template = get_template(template)
        settings.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    return settings


def main(args) -> int:
    """`vlmtune data check`; returns 0 only when no record has a blocking problem."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is loaded
    data_path, clean = Path(args.data_path), Path(args.write_clean) if args.write_clean else None
    if not data_path.is_file():
        raise UserError(f"{data_path}: data file not found")
    if not Path(args.image_folder).is_dir():
        raise UserError(f"--image-folder {args.image_folder}: not a folder")
    if clean is not None and clean.resolve() == data_path.resolve():
        raise UserError(f"--write-clean {clean} would overwrite the data being checked; choose another file")
    settings = settings_from_args(args)
    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    report = run_check(settings, workers, clean)
    report_path = Path(args.report or f"{data_path}.check.json")
    tmp = report_path.with_name(report_path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, report_path)
    except OSError as e:
        raise UserError(f"cannot write the report {report_path} ({e.strerror}); pass --report elsewhere") from None
    print_summary(report, report_path)
    return report["exit_code"]
