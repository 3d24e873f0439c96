"""Load any VLMEvalKit benchmark TSV (not MMBench: eval/mmbench_data.py) into checked `Row`s, images resolved.

As vlmeval/dataset/image_base.py ImageBaseDataset.__init__ builds `self.data`:
- rows whose image cell is empty are dropped (`skip_noimg=True`): VLMEvalKit neither asks nor scores them; the
  count is kept (`Benchmark.skipped`) and printed by the caller, never dropped silently;
- an image cell of at most 64 characters is the index of the row that holds the image (one level here);
- a cell written as a list literal holds several images (MMMU: "['<base64>', '<base64>']"), read with
  ast.literal_eval or JSON where VLMEvalKit runs `eval` (eval/tsv.py `literal_list`);
- the index is an int when every row's is one, else text (HallusionBench: 'VD_chart_0_0_0_0'-like indices).
The other cells are what eval/tsv.py `read_tsv` reads; the kind's own checks (columns, answers) are in its
module. Every image is opened (header only) here, so a corrupt one stops the run before the model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from vlmtune.errors import UserError
from vlmtune.eval.tsv import (MAX_IMAGE_REF_CHARS, check_image_size, decode_base64_image, literal_list,
                              open_base64_image, parse_index, read_tsv)


@dataclass(frozen=True)
class Row:
    """One TSV row that has an image: its index, its images (base64) and its other cells as pandas read them."""

    index: int | str
    images: tuple[str, ...]
    cells: dict  # column -> value (NaN for an empty cell), every column but `image`
    row: int  # 1-based data row in the file, for error messages
    file: str

    def where(self) -> str:
        """'FILE: row N (index I)', the prefix of every error about this row."""
        return f"{self.file}: row {self.row} (index {self.index})"

    def text(self, column: str) -> str | None:
        """The cell as text, None when the column is absent or the cell empty."""
        value = self.cells.get(column)
        return None if value is None or pd.isna(value) else str(value)

    def decode_images(self) -> list[Image.Image]:
        """The row's images as RGB (UserError naming the row for one that does not decode)."""
        return [decode_base64_image(image, self.where()) for image in self.images]


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark file: its kind's name, its rows with images in file order, and its table."""

    name: str  # the kind's name (MME, TextVQA_VAL, ...), which decides prompt and scoring
    file: Path
    rows: list[Row]
    table: pd.DataFrame  # the rows' cells (no image column), file order; the result sheet starts from it
    skipped: int  # rows without an image, dropped as VLMEvalKit drops them

    @property
    def stem(self) -> str:
        """The file name without extension: names the output files."""
        return self.file.stem


def load_benchmark(path: str | Path, name: str, required: tuple[str, ...]) -> Benchmark:
    """Read the TSV and resolve its images; a missing column, bad index or bad image raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    df = read_tsv(path)
    missing = [c for c in ("index", "image", *required) if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected VLMEvalKit's {name} TSV "
                        "(or pass --dataset NAME for the benchmark it is)")
    numbers = [row for row, cell in enumerate(df["image"], start=1) if not pd.isna(cell)]  # skip_noimg
    kept = df.iloc[[n - 1 for n in numbers]].reset_index(drop=True)
    if len(kept) == 0:
        raise UserError(f"{path}: no rows with an image")
    indices = _indices(kept, numbers, path)
    images = _resolve_images(list(kept["image"]), indices, numbers, path)
    kept["index"] = indices
    table = kept.drop(columns="image")
    rows = [Row(idx, imgs, cells, n, str(path))
            for idx, imgs, cells, n in zip(indices, images, table.to_dict("records"), numbers)]
    _check_images(rows)
    return Benchmark(name=name, file=path, rows=rows, table=table, skipped=len(df) - len(kept))


def _indices(df: pd.DataFrame, numbers: list[int], path: Path) -> list[int | str]:
    """Ints when every index is a non-negative integer, else the cells as text; empty or repeated is an error."""
    seen: dict[str, int] = {}
    for n, value in zip(numbers, df["index"]):
        if pd.isna(value) or not str(value).strip():
            raise UserError(f"{path}: row {n}: empty index")
        if str(value) in seen:
            raise UserError(f"{path}: row {n}: index {value} repeats row {seen[str(value)]}")
        seen[str(value)] = n
    ints = [parse_index(v) for v in df["index"]]
    return ints if None not in ints else [str(v) for v in df["index"]]


def _resolve_images(cells: list[str], indices: list, numbers: list[int], path: Path) -> list[tuple[str, ...]]:
    """Each row's base64 images: a short cell names the row holding them, a list literal holds several."""
    by_index = {str(idx): cell for idx, cell in zip(indices, cells)}
    resolved = []
    for idx, cell, n in zip(indices, cells, numbers):
        where = f"{path}: row {n} (index {idx})"
        if len(cell) <= MAX_IMAGE_REF_CHARS:
            target = by_index.get(cell.strip())
            if target is None or len(target) <= MAX_IMAGE_REF_CHARS:
                raise UserError(f"{where}: image cell {cell!r} is neither base64 nor the index of a row with an image")
            cell = target
        listed = literal_list(cell, where)
        images = tuple(str(x) for x in listed) if listed is not None else (cell,)
        if not images:
            raise UserError(f"{where}: the image list is empty")
        for image in images:
            check_image_size(image, where)
        resolved.append(images)
    return resolved


def _check_images(rows: list[Row]) -> None:
    """Open every distinct image (its header: format and size, no pixels); the first bad one raises UserError."""
    seen: set[str] = set()
    for row in rows:
        for image in row.images:
            if image not in seen:
                seen.add(image)
                with open_base64_image(image, row.where()):
                    pass


@dataclass(frozen=True)
class Scored:
    """A scorer's output (eval/mcq.py, yorn.py, vqa.py): VLMEvalKit's table, the per-row columns for the result
    sheet, and the headline numbers for the summary."""

    table: pd.DataFrame  # VLMEvalKit's layout and scale
    per_row: pd.DataFrame  # 'index' + the scoring columns, one row per predicted row, in file order
    headline: list[tuple[str, float, float]]  # (metric, value, full scale: 1, 100, 2000...)
    details: dict[str, pd.DataFrame] = field(default_factory=dict)  # more tables, by file suffix (MME's acc, acc+)
    notes: list[str] = field(default_factory=list)  # printed after the table
