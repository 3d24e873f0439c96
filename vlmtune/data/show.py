"""`vlmtune data show CFG [--index N ...]`: samples exactly as training tokenizes them (XTuner's `log-dataset`).

The samples come from the training dataset itself (`build_dataset` over the same cache, then
`LlavaDataset.load`), so what is shown is what the loss sees: the rendered text with every trained span
marked (green on a terminal, `[[...]]` otherwise), each image slot with the number of positions it expands
to, the ids and labels, and, when `max_length` cut the sample, where.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.errors import UserError

COLOURS = {"trained": ("\033[32m", "\033[0m"), "image": ("\033[36m", "\033[0m"), "cut": ("\033[31m", "\033[0m")}
PLAIN = {"trained": ("[[", "]]"), "image": ("", ""), "cut": ("", "")}


def main(args) -> int:
    """CLI entry."""
    from vlmtune.config import load_config, parse_cfg_options

    cfg = load_config(args.config, parse_cfg_options(args.cfg_options))
    work_dir = cfg.work_dir(args.work_dir)
    dataset, tokenizer, settings = _training_dataset(cfg, work_dir)
    marks = COLOURS if _colour(args.color) else PLAIN
    for index in args.index or [0]:
        if not -len(dataset) <= index < len(dataset):
            raise UserError(f"--index {index}: the dataset has {len(dataset)} samples (0 to {len(dataset) - 1})")
        print(render_sample(dataset, index % len(dataset), tokenizer, settings, marks))
    return 0


def _training_dataset(cfg, work_dir: Path):
    """(dataset, tokenizer, table Settings: image lengths, max_length) built as `vlmtune.train` builds them,
    without the model weights."""
    from vlmtune.data.dataset import build_dataset, cache_dir, table_settings
    from vlmtune.data.image import ImagePreprocessor
    from vlmtune.model.anyres import image_layout
    from vlmtune.model.build import load_tokenizer
    from vlmtune.model.vision import load_image_processor, vision_config
    from vlmtune.paths import require_model_folder

    require_model_folder(cfg.model.visual_encoder_name_or_path, "visual_encoder_name_or_path")
    tokenizer = load_tokenizer(cfg.model.llm_name_or_path, cfg.model.trust_remote_code)
    encoder = cfg.model.visual_encoder_name_or_path
    image_length, anyres = image_layout(vision_config(encoder), cfg.model.vision_feature_select_strategy,
                                        cfg.model.image_grid_pinpoints)
    preprocess = ImagePreprocessor(load_image_processor(encoder), cfg.data.pad_image_to_square, cfg.data.image_preprocess,
                                   cfg.model.image_grid_pinpoints)
    dataset, report = build_dataset(cfg.data, tokenizer, preprocess, image_length, cache_dir(cfg.data, work_dir), anyres)
    print(f"{cfg.data.data_path}: {report.summary()}", file=sys.stderr)
    return dataset, tokenizer, table_settings(cfg.data, image_length, anyres)


def _colour(choice: str) -> bool:
    if choice == "auto":
        return sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return choice == "always"


def render_sample(dataset, index: int, tokenizer, settings, marks=PLAIN) -> str:
    """The report for one dataset index: header, marked text, ids, labels; `settings`: the table's
    (data/table.py Settings: positions per image, max_length)."""
    sample = dataset.load(index)  # the training sample; RecordError (a missing image) propagates as is
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    row = dataset.table[index]
    full = _full_length(dataset, row)
    n_images, max_length = ids.count(IMAGE_TOKEN_INDEX), settings.max_length
    image_lengths = settings.image_lengths([tuple(hw) for hw in sample["image_sizes"].tolist()])
    length = len(ids) - n_images + sum(image_lengths)
    trained = sum(label != IGNORE_INDEX for label in labels)
    images = ", ".join(row["images"]) or "none"
    cut = f"cut at {length} of {full} (max_length {max_length})" if full is not None and full > length else \
        f"not truncated (max_length {max_length})"
    counts = f"{n_images} image x {settings.image_length}" if settings.anyres is None else \
        f"images {' + '.join(map(str, image_lengths)) or 0}"  # AnyRes: each image's own count
    lines = [f"sample {index} of {len(dataset)}: id {row['id']!r}, images: {images}",
             f"  {length} positions ({counts} + {len(ids) - n_images} text), {trained} trained; {cut}",
             "  text (trained spans marked):" if marks is PLAIN else "  text (trained spans in green):",
             _marked_text(ids, labels, tokenizer, image_lengths, marks, full is not None and full > length),
             f"  input_ids ({len(ids)}): {ids}",
             f"  labels    ({len(labels)}): {labels}"]
    return "\n".join(lines)


def _full_length(dataset, row) -> int | None:
    """Image-expanded length before truncation (text tables re-tokenize the row; token tables keep only the
    truncated ids, so None)."""
    if dataset.row_tokenizer is None:
        return None
    from vlmtune.data.tokenize import tokenize_conversation

    s = dataset.row_tokenizer.settings
    turns = list(zip(row["users"], row["answers"]))
    return tokenize_conversation(turns, dataset.row_tokenizer.tokenizer, s.template, sys.maxsize,
                                 s.row_image_length(row), row["system"]).length


def _marked_text(ids: list[int], labels: list[int], tokenizer, image_lengths: list[int], marks, truncated: bool) -> str:
    """Decoded runs of ids: image slot i as `<image x P_i>`, trained runs wrapped in the `trained` marks."""
    out, run, run_trained, lengths = [], [], False, iter(image_lengths)

    def flush():
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            start, end = marks["trained"] if run_trained else ("", "")
            out.append(f"{start}{text}{end}")

    for token, label in zip(ids, labels):
        if token == IMAGE_TOKEN_INDEX:
            flush()
            run = []
            start, end = marks["image"]
            out.append(f"{start}<image x{next(lengths)}>{end}")
            continue
        trained = label != IGNORE_INDEX
        if trained != run_trained:
            flush()
            run, run_trained = [], trained
        run.append(token)
    flush()
    if truncated:
        start, end = marks["cut"]
        out.append(f"{start}<-- cut here by max_length: the rest is not trained on{end}")
    return "".join(out)
