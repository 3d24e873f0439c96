"""eval/sheets.py: reading a predictions file for a data file (ours, VLMEvalKit's) and writing the result sheet."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from vlmtune.errors import UserError
from vlmtune.eval.sheets import read_predictions_for, result_sheet, write_xlsx

QUESTIONS = {0: "Is it red?", 1: "Is it blue?"}


def test_vlmevalkit_style_sheet_is_read_with_its_missing_values(tmp_path):
    """An xlsx as VLMEvalKit writes it: an empty prediction cell is read back as NaN, kept here as ''."""
    path = tmp_path / "model_MME.xlsx"
    write_xlsx(pd.DataFrame({"index": [0, 1], "question": ["Is it red?", "Is it blue?"], "prediction": ["Yes", None]}),
               path)
    assert read_predictions_for(path, [0, 1], QUESTIONS, Path("MME.tsv")) == {0: "Yes", 1: ""}


@pytest.mark.parametrize(("sheet", "message"), [
    ({"index": [0, 7], "prediction": ["a", "b"]}, r"p.csv: row 3: index 7 is not a row of MME.tsv; give each"),
    ({"index": [0], "question": ["Is it green?"], "prediction": ["a"]}, r"row 2: the question of index 0 differs"),
    ({"index": [0, 0], "prediction": ["a", "b"]}, r"row 3: index 0 appears twice"),
    ({"id": [0], "prediction": ["a"]}, r"needs 'index' and 'prediction' columns"),
])
def test_a_file_for_another_benchmark_is_refused(tmp_path, sheet, message):
    path = tmp_path / "p.csv"
    pd.DataFrame(sheet).to_csv(path, index=False)
    with pytest.raises(UserError, match=message):
        read_predictions_for(path, [0, 1], QUESTIONS, Path("MME.tsv"))


def test_text_indices_and_jsonl_logs(tmp_path):
    log = tmp_path / "predictions.jsonl"
    log.write_text('{"index": "VD_1", "prediction": "Yes"}\n')
    assert read_predictions_for(log, ["VD_1", "VD_2"], {}, Path("HallusionBench.tsv")) == {"VD_1": "Yes"}


def test_result_sheet_keeps_file_order_and_drops_control_characters(tmp_path):
    table = pd.DataFrame({"index": [3, 1, 2], "question": ["a", "b", "c"]})
    sheet = result_sheet(table, {2: "x\x07y", 3: "z"}, pd.DataFrame({"index": [3, 2], "hit": [1, 0]}))
    assert list(sheet["index"]) == [3, 2] and list(sheet["hit"]) == [1, 0]
    write_xlsx(sheet, tmp_path / "r.xlsx")
    assert list(pd.read_excel(tmp_path / "r.xlsx")["prediction"]) == ["z", "xy"]
