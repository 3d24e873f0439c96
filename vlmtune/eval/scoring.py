"""MMBench scoring: single-pass and CircularEval accuracy, overall, per L2 ability and per L3 category.

Single pass scores the original questions (index < 1e6). CircularEval groups a question with its rotated
copies (index % 1e6) and counts it only if every rotation in the file is extracted and correct
(VLMEvalKit vlmeval/dataset/utils/multiple_choice.py mcq_circular_eval / prefetch_circular_group under
exact matching; XTuner tools/mmbench.py eval_result). The table layout follows VLMEvalKit `report_acc`:
one row per split, then Overall, the L2 abilities (abbreviated, sorted by full name), the L3 categories
(sorted), as fractions in [0, 1].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlmtune.eval.matchers import extract_answer
from vlmtune.eval.mmbench_data import CIRCULAR_STRIDE, MMBenchData

# VLMEvalKit multiple_choice.py MMB_abbrs (XTuner MMBenchDataset.ABBRS has the same six)
MMB_ABBRS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
EVALS = ("circular", "single")


@dataclass(frozen=True)
class Verdict:
    """One predicted row: what the matcher extracted and whether it equals the answer."""

    index: int
    prediction: str
    extracted: str | None
    hit: bool


@dataclass(frozen=True)
class Report:
    """Per-row verdicts and the accuracy table (columns: eval, split, Overall, L2..., L3...)."""

    verdicts: list[Verdict]
    table: pd.DataFrame
    missing: int  # rows of the file without a prediction (they count as wrong in CircularEval)


def judge(data: MMBenchData, predictions: dict[int, str], matcher: str) -> list[Verdict]:
    """Extract and check every predicted row of a dev file, in file order."""
    verdicts = []
    for q in data.questions:
        if q.index in predictions:
            extracted = extract_answer(predictions[q.index], q.options, matcher)
            verdicts.append(Verdict(q.index, predictions[q.index], extracted, extracted == q.answer))
    return verdicts


def single_hits(verdicts: list[Verdict]) -> dict[int, bool]:
    """Main question index -> hit, for the predicted original questions only."""
    return {v.index: v.hit for v in verdicts if v.index < CIRCULAR_STRIDE}


def circular_hits(data: MMBenchData, verdicts: list[Verdict]) -> dict[int, bool]:
    """Main question index -> every rotation of it in the file was predicted, extracted and correct."""
    hit = {v.index: v.hit for v in verdicts}
    groups: dict[int, bool] = {}
    for q in data.questions:
        key = q.index % CIRCULAR_STRIDE
        groups[key] = groups.get(key, True) and hit.get(q.index, False)
    return {key: ok for key, ok in groups.items() if key in hit}  # groups whose original was predicted


def accuracy_rows(data: MMBenchData, hits: dict[int, bool], eval_name: str) -> list[dict]:
    """VLMEvalKit report_acc over main questions: one dict per split (splits sorted; 'none' if absent)."""
    main = {q.index: q for q in data.questions if q.index in hits}
    df = pd.DataFrame(
        {
            "split": [q.split or "none" for q in main.values()],
            "l2-category": [q.l2_category for q in main.values()],
            "category": [q.category for q in main.values()],
            "hit": [float(hits[i]) for i in main],
        }
    )
    return [{"eval": eval_name, **row} for row in report_acc(df)]


def report_acc(df: pd.DataFrame) -> list[dict]:
    """VLMEvalKit multiple_choice.py report_acc on a frame of hits (0/1) with optional split, l2-category and
    category columns: one dict per split ('none' without the column): 'split', Overall, then each L2 ability
    (abbreviated, sorted by full name), each category (sorted), as fractions; NaN where a split has none.

    VLMEvalKit lists the splits in `set` order, which varies between runs; they are sorted here."""
    splits = sorted(set(df["split"])) if "split" in df else ["none"]
    split_of = df["split"] if "split" in df else pd.Series(["none"] * len(df), index=df.index)
    rows = []
    for split in splits:
        part = df[split_of == split]
        row = {"split": split, "Overall": part["hit"].mean()}
        for column, names in (("l2-category", MMB_ABBRS), ("category", {})):
            if column not in df:
                continue
            for ability in sorted(set(df[column])):  # every ability of the file, NaN if absent in this split
                sub = part[part[column] == ability]["hit"]
                row[names.get(ability, ability)] = sub.mean() if len(sub) else np.nan
        rows.append(row)
    return rows


def score(data: MMBenchData, predictions: dict[int, str], matcher: str) -> Report:
    """Judge the predictions of a dev file and build the circular + single-pass accuracy table."""
    verdicts = judge(data, predictions, matcher)
    rows = accuracy_rows(data, circular_hits(data, verdicts), "circular")
    rows += accuracy_rows(data, single_hits(verdicts), "single")
    missing = sum(q.index not in predictions for q in data.questions)
    return Report(verdicts=verdicts, table=pd.DataFrame(rows), missing=missing)


def format_table(table: pd.DataFrame) -> str:
    """Accuracy (%) as text: one line per metric, one column per (eval, split)."""
    metrics = [c for c in table.columns if c not in ("eval", "split")]
    heads = [f"{r['eval']}/{r['split']}" for _, r in table.iterrows()]
    width = max(len(m) for m in metrics + ["Metric"])
    lines = [f"{'Metric':<{width}}  " + "  ".join(f"{h:>16}" for h in heads)]
    for m in metrics:
        cells = ["-" if pd.isna(v) else f"{100 * v:.1f}" for v in table[m]]
        lines.append(f"{m:<{width}}  " + "  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def write_report(report: Report, data: MMBenchData, matcher: str, run_dir: Path) -> dict[str, Path]:
    """Write <name>_acc.csv, <name>_acc.json and <name>_acc.png into run_dir; return their paths."""
    paths = {ext: run_dir / f"{data.name}_acc.{ext}" for ext in ("csv", "json", "png")}
    report.table.to_csv(paths["csv"], index=False)
    summary = {
        "data": str(data.file),
        "matcher": matcher,
        "questions": int(sum(q.is_main for q in data.questions)),
        "rows": len(data.questions),
        "predicted_rows": len(report.verdicts),
        "missing_rows": report.missing,
        "unextracted_rows": sum(v.extracted is None for v in report.verdicts),
        "accuracy": json.loads(report.table.to_json(orient="records")),  # NaN -> null
    }
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_report(report.table, data.name, paths["png"])
    return paths


def plot_report(table: pd.DataFrame, title: str, path: Path) -> None:
    """Bar chart: Overall + L2 abilities on top, L3 categories below; one bar per (eval, split)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before pyplot loads a backend
    import matplotlib.pyplot as plt

    metrics = [c for c in table.columns if c not in ("eval", "split")]
    l2 = ["Overall"] + [a for a in MMB_ABBRS.values() if a in metrics]
    l3 = [m for m in metrics if m not in l2]
    panels = [p for p in (l2, l3) if p]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * len(l3) + 2), 4.5 * len(panels)))
    for ax, names in zip(np.atleast_1d(axes), panels):
        width = 0.8 / len(table)
        for k, (_, row) in enumerate(table.iterrows()):
            x = np.arange(len(names)) + k * width
            bars = ax.bar(x, [100 * row[n] for n in names], width, label=f"{row['eval']}/{row['split']}")
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)  # a 0.0 score stays visible
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60 if names is l3 else 0,
                      ha="right" if names is l3 else "center", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
