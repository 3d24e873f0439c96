"""MMBench run outputs: the timestamped run folder, args.json, the predictions sheet, the resumable
prediction log, and `finish_run` / `rescore`, which turn predictions into the sheet and the report.

A model-driven `run_mmbench(generator, data_path, work_dir, ...)` is expected to do:

    data = load_mmbench(data_path)
    run_dir = make_run_dir(work_dir)
    write_args(run_dir, args)
    with PredictionStore(run_dir / "predictions.jsonl") as store:  # or an earlier run's file, to resume
        todo = [q for q in data.questions if q.index not in store.done]
        for q, text in zip(todo, generate([build_prompt(q) for q in todo], [decode_image(q) for q in todo])):
            store.add(q.index, text)
    finish_run(data, store.done, matcher, run_dir)

The sheet is the MMBench submission format on test files: the TSV's columns without `image`, plus
`prediction`. XTuner's mmbench_result.xlsx and VLMEvalKit's prediction xlsx load back with `rescore` too.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from vlmtune.errors import UserError
from vlmtune.eval.matchers import check_matcher
from vlmtune.eval.mmbench_data import MMBenchData, load_mmbench, parse_index
from vlmtune.eval.scoring import Report, Verdict, format_table, score, write_report


def make_run_dir(work_dir: str | Path) -> Path:
    """A new work_dir/YYYYmmdd_HHMMSS folder (XTuner's layout); '_2', '_3'... if that second is taken."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        run_dir = Path(work_dir) / (stamp if k == 1 else f"{stamp}_{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"{work_dir}: too many runs started at {stamp}")


def write_args(run_dir: Path, args: dict) -> Path:
    """Save the run's arguments as args.json (values that are not JSON are written as strings)."""
    path = run_dir / "args.json"
    path.write_text(json.dumps(args, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


class PredictionStore:
    """Append-only JSONL of {"index", "prediction"} lines; reopening the file resumes where it stopped.

    `done` maps index -> prediction for every complete line. A partial last line (a crash mid-write) is cut
    off on open, so new lines never glue onto it. Each line is flushed as soon as it is written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: dict[int, str] = read_prediction_log(self.path, repair=True)
        self._file = self.path.open("a", encoding="utf-8")

    def add(self, index: int, prediction: str) -> None:
        """Record one prediction and flush it to disk."""
        line = json.dumps({"index": int(index), "prediction": prediction}, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        self.done[int(index)] = prediction

    def close(self) -> None:
        """Close the file (further `add`s fail)."""
        self._file.close()

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_prediction_log(path: Path, repair: bool = False) -> dict[int, str]:
    """Index -> prediction from a PredictionStore file; a partial last line is ignored (cut off if repair)."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # b"" when no line is complete
    if repair and len(complete) < len(raw):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    done = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
            prediction = record["prediction"]
            done[int(record["index"])] = "" if prediction is None else str(prediction)  # null: no answer
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: line {number} is not an {{index, prediction}} record ({e})") from None
    return done


PREDICTION_SUFFIXES = (".xlsx", ".csv", ".tsv", ".jsonl")


def read_predictions(path: str | Path) -> dict[int, str]:
    """Index -> prediction from a predictions .xlsx (ours, XTuner's, VLMEvalKit's), a .csv/.tsv table with
    the same columns, or a .jsonl log."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: predictions file not found")
    if path.suffix == ".jsonl":
        return read_prediction_log(path)
    if path.suffix not in PREDICTION_SUFFIXES:
        raise UserError(f"{path}: predictions must be one of {', '.join(PREDICTION_SUFFIXES)} files")
    try:
        if path.suffix == ".xlsx":
            df = pd.read_excel(path)
        else:  # predictions are text: "None" or "NA" stay what the model said
            df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype={"prediction": str},
                             keep_default_na=False, na_values={"prediction": [""]})
    except Exception as e:  # openpyxl and the csv parser raise many types for a file they cannot read
        raise UserError(f"{path}: not a readable {path.suffix} ({type(e).__name__}: {e})") from None
    if "index" not in df.columns or "prediction" not in df.columns:
        raise UserError(f"{path}: needs 'index' and 'prediction' columns, found {', '.join(map(str, df.columns))}")
    predictions: dict[int, str] = {}
    for row, (index, prediction) in enumerate(zip(df["index"], df["prediction"]), start=2):
        idx = parse_index(index)
        if idx is None:
            raise UserError(f"{path}: sheet row {row}: index {index!r} is not a non-negative integer")
        if idx in predictions:
            raise UserError(f"{path}: sheet row {row}: index {idx} appears twice")
        predictions[idx] = "" if pd.isna(prediction) else str(prediction)
    return predictions


def write_predictions_sheet(data: MMBenchData, predictions: dict[int, str], verdicts: list[Verdict] | None,
                            path: Path) -> Path:
    """The TSV's columns without image + prediction (+ extracted, hit on dev) for the predicted rows."""
    predicted = [q.index in predictions for q in data.questions]
    sheet = data.table[predicted].copy()
    sheet["prediction"] = [predictions[q.index] for q in data.questions if q.index in predictions]
    if verdicts is not None:
        sheet["extracted"] = [v.extracted for v in verdicts]
        sheet["hit"] = [int(v.hit) for v in verdicts]
    # openpyxl refuses control characters; a model can emit them, so they are dropped from the sheet only
    for column in sheet.columns[sheet.dtypes == object]:
        sheet[column] = [ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in sheet[column]]
    sheet.to_excel(path, index=False, engine="openpyxl")
    return path


def finish_run(data: MMBenchData, predictions: dict[int, str], matcher: str, run_dir: Path) -> Report | None:
    """Write the predictions sheet, and on a dev file score it, write the report and print the table."""
    check_matcher(matcher)
    check_predictions(data, predictions)
    sheet_path = run_dir / f"{data.name}_result.xlsx"
    if not data.has_answers:
        write_predictions_sheet(data, predictions, None, sheet_path)
        print(f"{data.file} has no answers (test split): submit {sheet_path} to the MMBench server")
        return None
    report = score(data, predictions, matcher)
    write_predictions_sheet(data, predictions, report.verdicts, sheet_path)
    paths = write_report(report, data, matcher, run_dir)
    print(f"MMBench ({data.file}), matcher {matcher}, exact matching (no GPT judge)")
    if report.missing:
        print(f"warning: {report.missing} of {len(data.questions)} rows have no prediction; "
              "CircularEval counts their questions wrong")
    print(format_table(report.table))
    print(f"Results saved to {run_dir} ({sheet_path.name}, {paths['csv'].name}, {paths['png'].name})")
    return report


def check_predictions(data: MMBenchData, predictions: dict[int, str]) -> None:
    """A UserError unless `predictions` is a non-empty set of rows of `data`."""
    unknown = sorted(set(predictions) - {q.index for q in data.questions})
    if unknown:
        raise UserError(f"{len(unknown)} predicted indices are not in {data.file} (first: {unknown[0]}); "
                        "predictions must come from the same file")
    if not predictions:
        raise UserError(f"no predictions to write for {data.file}")


def rescore(predictions_xlsx: str | Path, data_path: str | Path, matcher: str, work_dir: str | Path) -> Path:
    """Score an existing predictions file (no model) into a new run folder under work_dir; return it."""
    check_matcher(matcher)
    data = load_mmbench(data_path)
    predictions = read_predictions(predictions_xlsx)
    check_predictions(data, predictions)  # before the run folder exists: a mismatch leaves nothing behind
    run_dir = make_run_dir(work_dir)
    write_args(run_dir, {"predictions": str(predictions_xlsx), "data_path": str(data_path),
                         "matcher": matcher, "work_dir": str(work_dir)})
    finish_run(data, predictions, matcher, run_dir)
    return run_dir
