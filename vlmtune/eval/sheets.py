"""Prediction sheets in and out: reading a predictions file for a benchmark, writing the result .xlsx.

A predictions file is ours (`<name>_result.xlsx`, or a run's `predictions.jsonl`), VLMEvalKit's
(`<model>_<dataset>.xlsx`), XTuner's `mmbench_result.xlsx`, or any .csv/.tsv with `index` and `prediction`
columns. Its indices must be rows of the data file it is given with; a sheet that has a `question` column must
also agree with the data file's questions, so a predictions file for another benchmark (or another version of
it) is refused with one line before anything is scored.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from vlmtune.errors import UserError
from vlmtune.eval.runner import read_prediction_log
from vlmtune.eval.tsv import parse_index

PREDICTION_SUFFIXES = (".xlsx", ".csv", ".tsv", ".jsonl")


def read_prediction_table(path: Path) -> pd.DataFrame:
    """The file's index and prediction columns (+ question when it has one); predictions of .csv/.tsv as
    written ("None" stays "None"), .xlsx as pandas reads it (as VLMEvalKit reads its own)."""
    if not path.is_file():
        raise UserError(f"{path}: predictions file not found")
    if path.suffix == ".jsonl":
        log = read_prediction_log(path)
        return pd.DataFrame({"index": list(log), "prediction": list(log.values())}, dtype=object)
    if path.suffix not in PREDICTION_SUFFIXES:
        raise UserError(f"{path}: predictions must be one of {', '.join(PREDICTION_SUFFIXES)} files")
    try:
        if path.suffix == ".xlsx":
            df = pd.read_excel(path)
        else:
            df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype={"prediction": str},
                             keep_default_na=False, na_values={"prediction": [""]})
    except Exception as e:  # openpyxl and the csv parser raise many types for a file they cannot read
        raise UserError(f"{path}: not a readable {path.suffix} ({type(e).__name__}: {e})") from None
    if "index" not in df.columns or "prediction" not in df.columns:
        raise UserError(f"{path}: needs 'index' and 'prediction' columns, found {', '.join(map(str, df.columns))}")
    return df[[c for c in ("index", "prediction", "question") if c in df.columns]]


def read_predictions_for(path: str | Path, indices: list, questions: dict, data_file: Path) -> dict:
    """Index -> prediction from `path`, keyed like the data file's rows (`indices`: ints or text).

    `questions` maps index -> question text of the data file; a sheet row whose question differs, or whose
    index is not a row of the data file, raises UserError naming both files and the sheet row."""
    path = Path(path)
    df = read_prediction_table(path)
    as_int = bool(indices) and isinstance(indices[0], int)
    known = set(indices)
    fix = "give each --data-path its own predictions file, in the same order"
    predictions: dict = {}
    first = 2 if path.suffix != ".jsonl" else 1  # a sheet's first data row is row 2 (row 1: the header)
    for n, record in enumerate(df.to_dict("records"), start=first):
        raw = record["index"]
        idx = parse_index(raw) if as_int else (None if pd.isna(raw) else str(raw))
        if idx not in known:
            raise UserError(f"{path}: row {n}: index {raw!r} is not a row of {data_file}; {fix}")
        if idx in predictions:
            raise UserError(f"{path}: row {n}: index {idx} appears twice")
        question = record.get("question")
        if isinstance(question, str) and isinstance(questions.get(idx), str) and question != questions[idx]:
            raise UserError(f"{path}: row {n}: the question of index {idx} differs from {data_file}'s; {fix}")
        prediction = record["prediction"]
        predictions[idx] = "" if pd.isna(prediction) else str(prediction)
    if not predictions:
        raise UserError(f"{path}: no predictions")
    return predictions


def write_xlsx(sheet: pd.DataFrame, path: Path) -> Path:
    """Write a sheet; control characters, which openpyxl refuses and a model can emit, are dropped from it (the
    prediction logs keep them). Every column: pandas 3 stores text as its own string dtype, not object."""
    sheet = sheet.copy()
    for column in sheet.columns:
        sheet[column] = [ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in sheet[column]]
    sheet.to_excel(path, index=False, engine="openpyxl")
    return path


def result_sheet(table: pd.DataFrame, predictions: dict, per_row: pd.DataFrame | None) -> pd.DataFrame:
    """The data's columns (no image) for the predicted rows, file order, + prediction + the scorer's columns."""
    sheet = table[[i in predictions for i in table["index"]]].reset_index(drop=True)
    sheet["prediction"] = [predictions[i] for i in sheet["index"]]
    if per_row is not None:
        if list(per_row["index"]) != list(sheet["index"]):
            raise ValueError("the scorer's rows are not the predicted rows in file order")
        for column in per_row.columns.drop("index"):
            sheet[column] = list(per_row[column])
    return sheet
