"""eval/summary.py: the headline numbers of a run in summary.csv / .json / .png."""
from __future__ import annotations

import json

import pandas as pd

from vlmtune.eval.summary import format_summary, summary_rows, write_summary


def test_summary_files_and_percent_of_full_scale(tmp_path):
    rows = summary_rows("MME", "MME", [("perception", 1500.0, 2000.0)]) + summary_rows("X", "X", [("Overall", 0.5, 1.0)])
    assert [r["percent"] for r in rows] == [75.0, 50.0]
    paths = write_summary(rows, tmp_path)
    assert pd.read_csv(paths["csv"])["value"].tolist() == [1500.0, 0.5]
    assert json.loads(paths["json"].read_text())["results"][0]["metric"] == "perception"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert format_summary(rows).splitlines()[0].split() == ["MME", "perception", "1500.0000", "(of", "2000)"]
