"""The headline numbers of every benchmark in one `vlmtune eval` run: summary.csv, summary.json, summary.png.

One line per headline number: the benchmark (file name), its kind, the metric, the value on VLMEvalKit's scale
(fractions for multiple choice, percent for yes/no and VQA, sums for MME and OCRBench) and the full scale it is
out of; `percent` = value / full * 100 puts them on one axis for the bar chart.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

COLUMNS = ["benchmark", "kind", "metric", "value", "full", "percent"]


def summary_rows(benchmark: str, kind: str, headline: list[tuple[str, float, float]]) -> list[dict]:
    """The summary lines of one benchmark (none for a test split, which has no score)."""
    return [{"benchmark": benchmark, "kind": kind, "metric": metric, "value": value, "full": full,
             "percent": 100 * value / full} for metric, value, full in headline]


def write_summary(rows: list[dict], run_dir: Path) -> dict[str, Path]:
    """summary.csv, summary.json (with the run folder) and the bar chart summary.png; their paths."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    paths = {ext: run_dir / f"summary.{ext}" for ext in ("csv", "json", "png")}
    table.to_csv(paths["csv"], index=False)
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    paths["json"].write_text(json.dumps({"run_dir": str(run_dir), "results": records}, indent=2,
                                        ensure_ascii=False) + "\n", encoding="utf-8")
    plot_summary(table, paths["png"])
    return paths


def format_summary(rows: list[dict]) -> str:
    """The summary as aligned text, one line per number."""
    if not rows:
        return "no scored benchmark (test splits only)"
    width = max(len(f"{r['benchmark']} {r['metric']}") for r in rows)
    return "\n".join(f"{r['benchmark'] + ' ' + r['metric']:<{width}}  {r['value']:>10.4f}  (of {r['full']:g})"
                     for r in rows)


def plot_summary(table: pd.DataFrame, path: Path) -> None:
    """Horizontal bars, one per headline number, in percent of its full scale, labelled with the value."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before pyplot loads a backend
    import matplotlib.pyplot as plt

    labels = [f"{b} {m}" for b, m in zip(table["benchmark"], table["metric"])]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * max(1, len(table))))
    bars = ax.barh(range(len(table)), table["percent"].fillna(0), color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:g}" for v in table["value"]], fontsize=8, padding=2)
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()  # first benchmark on top
    ax.set_xlim(0, 110)
    ax.set_xlabel("% of the metric's full scale")
    ax.set_title("vlmtune eval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
