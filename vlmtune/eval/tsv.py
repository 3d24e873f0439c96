"""Reading VLMEvalKit's benchmark TSVs: the table, row indices, base64 images and literal cells.

One reader for the format, used by MMBench (eval/mmbench_data.py) and every other benchmark (eval/bench_data.py).

pandas: VLMEvalKit reads a TSV with `pd.read_csv(f, sep='\\t')` (vlmeval/smp/file.py `load`) and its predictions
back from xlsx with `pd.read_excel`. Both turn the cells "", "None", "NA", "N/A", "null", "nan"... into NaN, and
its scorers then see `str(NaN)`, the text "nan". `read_tsv` keeps those defaults for every column but two kinds:
`image` is text (an image reference stays the exact digits of the cell), and an option cell (A..Z) is the text it
holds, missing only when empty (VLMEvalKit issue #1559: pandas' defaults drop an option "None" from the prompt
while the answer still names it). `as_scored` applies the same defaults to a model's answer, so a prediction
"None" or "" is scored as "nan", as VLMEvalKit scores it after its xlsx round trip.
"""
from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import string
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from PIL import Image

from vlmtune.data.image import to_rgb
from vlmtune.errors import UserError

MAX_IMAGE_REF_CHARS = 64  # VLMEvalKit: an image cell this short is another row's index, not base64
MAX_IMAGE_MB = 50  # refuse larger images before decoding (base64 holds 3 bytes per 4 characters)
# pandas.read_csv's (and read_excel's) default missing-value strings, from its documentation
PANDAS_NA = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
_PANDAS_NA = frozenset(PANDAS_NA)


def read_tsv(path: Path) -> pd.DataFrame:
    """The TSV as VLMEvalKit reads it, except `image` and option columns (A..Z) as text (module docstring)."""
    try:
        columns = pd.read_csv(path, sep="\t", nrows=0).columns
        options = [c for c in columns if c in string.ascii_uppercase]
        return pd.read_csv(path, sep="\t", dtype={"image": str, **dict.fromkeys(options, str)}, keep_default_na=False,
                           na_values={c: [""] if c in options else PANDAS_NA for c in columns})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable TSV ({e})") from None


def parse_index(value) -> int | None:
    """A cell as a non-negative integer index (12, 12.0, '12'), or None when it is not one."""
    try:
        idx = int(value)
    except (TypeError, ValueError):
        return None
    if idx < 0 or not (idx == value or str(idx) == str(value).strip()):
        return None
    return idx


def cell_text(value) -> str:
    """A pandas-read cell as VLMEvalKit's scorers see it: `str(value)`, so a missing cell is the text 'nan'."""
    return str(value)


def as_scored(prediction: str) -> str:
    """A model's answer as VLMEvalKit scores it after writing it to xlsx and reading it back: 'nan' for the
    texts pandas reads as missing ("", "None", "NA", "null"...), else unchanged."""
    return "nan" if prediction in _PANDAS_NA else prediction


def literal_list(cell: str, where: str) -> list | None:
    """A cell holding a list literal ("['a', 'b']", or JSON) as a list; None for a cell that is not bracketed.

    VLMEvalKit runs Python `eval` on such cells (vlmeval/smp/misc.py toliststr and istype); a TSV is data, so
    only literals are read and a bracketed cell that is not one is an error.
    """
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    for parse in (ast.literal_eval, json.loads):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    raise UserError(f"{where}: cell {_short(text)} looks like a list but is not a Python or JSON list literal; "
                    "write it as ['a', 'b']")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@contextlib.contextmanager
def open_base64_image(data: str, where: str) -> Iterator[Image.Image]:
    """A base64 image, opened; errors while open or in the `with` body raise UserError naming `where`."""
    try:
        raw = base64.b64decode(data)  # lenient like XTuner's and VLMEvalKit's decode_base64_to_image
        with Image.open(io.BytesIO(raw)) as image:  # PIL's decompression-bomb guard stays on
            yield image
    except Image.DecompressionBombError as e:
        raise UserError(f"{where}: image refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # binascii.Error is a ValueError
        raise UserError(f"{where}: image is not a decodable base64 image ({e})") from None


def decode_base64_image(data: str, where: str) -> Image.Image:
    """A base64 image as RGB; bad base64 or an undecodable image raises UserError naming `where`."""
    with open_base64_image(data, where) as image:
        image.load()
        return to_rgb(image)


def check_image_size(data: str, where: str) -> None:
    """UserError for base64 text longer than MAX_IMAGE_MB of image, before anything decodes it."""
    if len(data) > MAX_IMAGE_MB * 2**20 * 4 // 3:
        raise UserError(f"{where}: image is over {MAX_IMAGE_MB} MB; refusing to decode it")
