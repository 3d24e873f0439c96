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
    work_dir = Path(args.work_dir or Path("work_dirs") / cfg.name)
    dataset, tokenizer, image_length = _training_dataset(cfg, work_dir)
    marks = COLOURS if _colour(args.color) else PLAIN
    for index in args.index or [0]:
        if not -len(dataset) <= index < len(dataset):
            raise UserError(f"--index {index}: the dataset has {len(dataset)} samples (0 to {len(dataset) - 1})")
        print(render_sample(dataset, index % len(dataset), tokenizer, image_length, cfg.data.max_length, marks))
    return 0


def _training_dataset(cfg, work_dir: Path):
    """(dataset, tokenizer, image length) built as `vlmtune.train` builds them, without the model weights."""
    from vlmtune.data.dataset import build_dataset, cache_dir
    from vlmtune.data.image import ImagePreprocessor
    from vlmtune.model.build import load_tokenizer
    from vlmtune.model.vision import image_tokens, load_image_processor, vision_config
    from vlmtune.paths import require_model_folder

    require_model_folder(cfg.model.visual_encoder_name_or_path, "visual_encoder_name_or_path")
    tokenizer = load_tokenizer(cfg.model.llm_name_or_path, cfg.model.trust_remote_code)
    image_length = image_tokens(vision_config(cfg.model.visual_encoder_name_or_path))
    preprocess = ImagePreprocessor(load_image_processor(cfg.model.visual_encoder_name_or_path), cfg.data.pad_image_to_square,
                                   cfg.data.image_preprocess)
    dataset, report = build_dataset(cfg.data, tokenizer, preprocess, image_length, cache_dir(cfg.data, work_dir))
    print(f"{cfg.data.data_path}: {report.summary()}", file=sys.stderr)
    return dataset, tokenizer, image_length


def _colour(choice: str) -> bool:
    if choice == "auto":
        return sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return choice == "always"


def render_sample(dataset, index: int, tokenizer, image_length: int, max_length: int, marks=PLAIN) -> str:
    """The report for one dataset index: header, marked text, ids, labels."""
    sample = dataset.load(index)  # the training sample; RecordError (a missing image) propagates as is
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    row = dataset.table[index]
    full = _full_length(dataset, row)
    n_images = ids.count(IMAGE_TOKEN_INDEX)
    length = len(ids) + n_images * (image_length - 1)
    trained = sum(label != IGNORE_INDEX for label in labels)
    images = ", ".join(row["images"]) or "none"
    cut = f"cut at {length} of {full} (max_length {max_length})" if full is not None and full > length else \
        f"not truncated (max_length {max_length})"
    lines = [f"sample {index} of {len(dataset)}: id {row['id']!r}, images: {images}",
             f"  {length} positions ({n_images} image x {image_length} + {len(ids) - n_images} text), "
             f"{trained} trained; {cut}",
             "  text (trained spans marked):" if marks is PLAIN else "  text (trained spans in green):",
             _marked_text(ids, labels, tokenizer, image_length, marks, full is not None and full > length),
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
    return tokenize_conversation(turns, dataset.row_tokenizer.tokenizer, s.template, sys.maxsize, s.image_length,
                                 row["system"]).length


def _marked_text(ids: list[int], labels: list[int], tokenizer, image_length: int, marks, truncated: bool) -> str:
    """Decoded runs of ids: image slots as `<image x P>`, trained runs wrapped in the `trained` marks."""
    out, run, run_trained = [], [], False

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
            out.append(f"{start}<image x{image_length}>{end}")
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
