"""Load an MMBench / CCBench TSV (VLMEvalKit format) into checked `Question`s, and decode their images.

Columns: index, question, hint, A..Z (an empty cell = no such option), answer (dev only), category,
l2-category (absent in CCBench: the category stands in), split, source, comment, image (base64 JPEG).
Circular copies of question i have index i + k * 1_000_000 and rotated options. In VLMEvalKit's files a copy's
image cell holds the index of the row with the real image (vlmeval/dataset/image_base.py,
ImageBaseDataset.__init__: a cell of <= 64 characters is an index); legacy files repeat the image.

The file is read by eval/tsv.py `read_tsv`: with pandas defaults, as XTuner (tools/mmbench.py, MMBenchDataset)
and VLMEvalKit (smp `load`) read it, except for two kinds of column: `image` is text (an image reference stays the
exact digits of the cell), and an option cell (A..Z) is the text it holds, missing only when empty. Pandas'
defaults turn the option texts "None", "NA", "N/A", "null", "nan" into missing values (the option vanishes from
the prompt while the answer still names it: VLMEvalKit issue #1559; VLMEvalKit e8e78f0 still reads them so) and
an all-number option column into floats ("A. 1.0" for a cell holding 1). Each row's answer must be one of its option letters, so such a row, or
a lowercase answer, is an error instead of a silently wrong score. Every image is opened (header only) when the
file is loaded, so a corrupt one stops the run before the model loads.
"""
from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from vlmtune.errors import UserError
from vlmtune.eval.tsv import (MAX_IMAGE_MB, MAX_IMAGE_REF_CHARS, check_image_size, decode_base64_image,
                              open_base64_image, parse_index, read_tsv)

__all__ = ["MAX_IMAGE_MB", "MMBenchData", "Question", "decode_image", "load_mmbench"]  # MAX_IMAGE_MB: tests

CIRCULAR_STRIDE = 1_000_000  # copy k of question i has index i + k * CIRCULAR_STRIDE
REQUIRED_COLUMNS = ("index", "question", "A", "B", "category", "image")


@dataclass(frozen=True)
class Question:
    """One TSV row, checked. `image` is the resolved base64 string (a circular copy shares its source's)."""

    index: int
    question: str
    hint: str | None
    options: dict[str, str]  # letter -> text, in letter order, only the options present
    answer: str | None  # None on test splits
    category: str  # the L3 ability
    l2_category: str  # the L2 ability; the category itself when the file has no l2-category (CCBench)
    split: str | None
    image: str
    row: int  # 1-based data row in the file, for error messages
    file: str

    @property
    def is_main(self) -> bool:
        """True for the original question, False for a circular copy."""
        return self.index < CIRCULAR_STRIDE

    def where(self) -> str:
        """'FILE: row N (index I)', the prefix of every error about this row."""
        return f"{self.file}: row {self.row} (index {self.index})"


@dataclass(frozen=True)
class MMBenchData:
    """A loaded benchmark file: its questions in file order and its table without the image column."""

    file: Path
    questions: list[Question]
    table: pd.DataFrame  # every TSV column except `image`, file order; the predictions sheet starts from it

    @property
    def name(self) -> str:
        """The file name without extension, e.g. MMBench_DEV_EN; names the report files."""
        return self.file.stem

    @property
    def has_answers(self) -> bool:
        """True for dev files (scorable), False for test files (submission only)."""
        return self.questions[0].answer is not None


def load_mmbench(path: str | Path) -> MMBenchData:
    """Read and check an MMBench/CCBench TSV; any bad row raises UserError naming the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: MMBench data file not found")
    df = read_tsv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing or len(df) == 0:
        what = f"missing column(s) {', '.join(missing)}" if missing else "no rows"
        raise UserError(f"{path}: {what}; expected a VLMEvalKit MMBench TSV")
    indices = _check_indices(df, path)
    images = _resolve_images(list(df["image"]), indices, path)
    answers = _answers(df, path)
    letters = [c for c in string.ascii_uppercase if c in df.columns]
    questions = [
        _question(record, idx, image, answer, letters, row, path)
        for row, (record, idx, image, answer) in enumerate(
            zip(df.to_dict("records"), indices, images, answers), start=1
        )
    ]
    _check_images(questions)
    df["index"] = indices  # numbers in the predictions sheet, as the TSV has them
    return MMBenchData(file=path, questions=questions, table=df.drop(columns="image"))


def decode_image(question: Question) -> Image.Image:
    """The question's image as RGB; bad base64 or an undecodable or oversized image raises UserError."""
    return decode_base64_image(question.image, question.where())


def _check_images(questions: list[Question]) -> None:
    """Open every distinct image (its header: format and size, no pixels); the first bad one raises UserError."""
    seen: set[str] = set()
    for q in questions:
        if q.image not in seen:
            seen.add(q.image)
            with _open_image(q):
                pass


@contextlib.contextmanager
def _open_image(question: Question) -> Iterator[Image.Image]:
    """The question's image, opened; errors while open or in the `with` body raise UserError naming the row."""
    with open_base64_image(question.image, question.where()) as image:
        yield image


def _check_indices(df: pd.DataFrame, path: Path) -> list[int]:
    """The index column as ints; a missing, non-integer, negative or repeated index is an error."""
    seen: dict[int, int] = {}
    for row, value in enumerate(df["index"], start=1):
        idx = parse_index(value)
        if idx is None:
            raise UserError(f"{path}: row {row}: index {value!r} is not a non-negative integer")
        if idx in seen:
            raise UserError(f"{path}: row {row}: index {idx} repeats row {seen[idx]}")
        seen[idx] = row
    return list(seen)


def _resolve_images(cells: list, indices: list[int], path: Path) -> list[str]:
    """Base64 per row, following VLMEvalKit's short-cell references (one level, to a row with a real image)."""
    by_index = dict(zip(indices, cells))
    images = []
    for row, (idx, cell) in enumerate(zip(indices, cells), start=1):
        where = f"{path}: row {row} (index {idx})"
        if not isinstance(cell, str) or not cell:
            raise UserError(f"{where}: empty image cell")
        if len(cell) <= MAX_IMAGE_REF_CHARS:
            if not (cell.isascii() and cell.isdigit()):
                raise UserError(f"{where}: image cell {cell!r} is neither base64 nor the index of another row")
            target = by_index.get(int(cell))
            if not isinstance(target, str) or len(target) <= MAX_IMAGE_REF_CHARS:
                raise UserError(f"{where}: image refers to index {cell}, which has no image in this file")
            cell = target
        check_image_size(cell, where)
        images.append(cell)
    return images


def _answers(df: pd.DataFrame, path: Path) -> list[str | None]:
    """Answer letters, or all None for a test file (no answer column, or an all-empty one)."""
    if "answer" not in df.columns or df["answer"].isna().all():
        return [None] * len(df)
    for row, value in enumerate(df["answer"], start=1):
        if pd.isna(value):
            raise UserError(f"{path}: row {row}: empty answer in a file that has answers")
    return [str(v).strip() for v in df["answer"]]


def _question(record: dict, idx: int, image: str, answer, letters: list[str], row: int, path: Path) -> Question:
    """Build one Question from a TSV record (already-checked index, image and answer)."""

    def text(key: str) -> str | None:
        value = record.get(key)
        return None if value is None or pd.isna(value) else str(value)

    options = {c: str(record[c]) for c in letters if not pd.isna(record[c])}
    if len(options) < 2:
        raise UserError(f"{path}: row {row} (index {idx}): needs at least two options, found {len(options)}")
    if answer is not None and answer not in options:
        raise UserError(f"{path}: row {row} (index {idx}): answer {answer!r} is not one of the row's option letters "
                        f"({', '.join(options)}); write the letter of the right option")
    category = text("category")
    if category is None or text("question") is None:
        raise UserError(f"{path}: row {row} (index {idx}): empty question or category")
    return Question(
        index=idx, question=text("question"), hint=text("hint"), options=options, answer=answer,
        category=category, l2_category=text("l2-category") or category, split=text("split"),
        image=image, row=row, file=str(path),
    )
