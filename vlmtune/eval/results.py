"""MMBench outputs: the predictions sheet, and `finish_run` / `rescore`, which turn predictions into the sheet
and the report.

The run folder, args.json and the resumable prediction logs are the eval runner's (eval/runner.py); `finish_run`
is what `vlmtune mmbench` hands the runner to call on rank 0 once every row is predicted, and `rescore` runs it
on an existing predictions file without a model.

The sheet is the MMBench submission format on test files: the TSV's columns without `image`, plus
`prediction`. XTuner's mmbench_result.xlsx and VLMEvalKit's prediction xlsx load back with `rescore` too.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlmtune.errors import UserError
from vlmtune.eval.matchers import check_matcher
from vlmtune.eval.mmbench_data import MMBenchData, load_mmbench
from vlmtune.eval.runner import make_run_dir, write_args
from vlmtune.eval.scoring import Report, Verdict, format_table, score, write_report
from vlmtune.eval.sheets import read_prediction_table, write_xlsx
from vlmtune.eval.tsv import parse_index


def read_predictions(path: str | Path) -> dict[int, str]:
    """Index -> prediction from a predictions .xlsx (ours, XTuner's, VLMEvalKit's), a .csv/.tsv table with
    the same columns, or a .jsonl log (eval/sheets.py reads them all)."""
    path = Path(path)
    df = read_prediction_table(path)
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
    return write_xlsx(sheet, path)


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
