"""Yes/no benchmarks (MME, POPE, HallusionBench): VLMEvalKit's judge-free extraction and ratings, number for number.

The prompt is the row's question as written (ImageYORNDataset.build_prompt adds nothing for these three: MME's
questions carry their own "Please answer yes or no."). An answer is read by `yorn_extraction`: after
`process_punctuation` and lowercasing, the word 'yes' without the word 'no' is Yes, the reverse is No, anything
else (both, neither, a refusal, an empty answer) is Unknown, which matches no answer. A row scores when its
answer cell ('Yes' or 'No') equals the extraction.

Source: vlmeval/dataset/image_yorn.py ImageYORNDataset.evaluate and vlmeval/dataset/utils/yorn.py
(YOrN_Extraction, MME_rating, POPE_rating, Hallusion_rating) at VLMEvalKit e8e78f0. Scale: percent; MME's
subtask scores are acc + acc+ (each of 100), summed over subtasks.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from vlmtune.errors import UserError
from vlmtune.eval.bench_data import Benchmark, Row, Scored, load_benchmark
from vlmtune.eval.tsv import as_scored
from vlmtune.eval.vqa import process_punctuation

# utils/yorn.py MME_rating super_cates: VLMEvalKit calls cognition "reasoning"
MME_GROUPS = {
    "perception": ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                   "scene"),
    "reasoning": ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"),
}
MME_FULL = {"perception": 2000.0, "reasoning": 800.0}  # 200 per subtask (acc + acc+)
REQUIRED = {"MME": ("question", "answer", "category", "image_path"), "POPE": ("question", "answer", "category"),
            "HallusionBench": ("question", "answer", "l2-category")}


def yorn_extraction(prediction: str) -> str:
    """'Yes', 'No' or 'Unknown' (utils/yorn.py YOrN_Extraction)."""
    words = process_punctuation(prediction.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def load_yorn(path, name: str) -> Benchmark:
    """A yes/no TSV: the kind's columns present, a question and a 'Yes'/'No' answer in every row."""
    bench = load_benchmark(path, name, REQUIRED[name])
    for row in bench.rows:
        if row.text("question") is None:
            raise UserError(f"{row.where()}: empty question")
        if row.text("answer") not in ("Yes", "No"):
            raise UserError(f"{row.where()}: answer {row.text('answer')!r} must be Yes or No (VLMEvalKit compares "
                            "it case-sensitively with the extracted Yes/No)")
        if name == "HallusionBench":
            _hallusion_ids(row)
    return bench


def yorn_prompt(row: Row) -> str:
    """ImageBaseDataset.build_prompt: the question as written, behind the image(s)."""
    return "<image>\n" * len(row.images) + row.text("question")


def verdicts(bench: Benchmark, predictions: dict) -> pd.DataFrame:
    """The predicted rows (file order): index, extracted, score, and the cells the ratings group by."""
    rows = [r for r in bench.rows if r.index in predictions]
    extracted = [yorn_extraction(as_scored(predictions[r.index])) for r in rows]
    return pd.DataFrame({
        "index": [r.index for r in rows],
        "extracted": extracted,
        "score": [r.text("answer") == e for r, e in zip(rows, extracted)],
        "answer": [r.text("answer") for r in rows],
        "category": [r.cells.get("category") for r in rows],
        "l2-category": [r.cells.get("l2-category") for r in rows],
        "image_path": [r.cells.get("image_path") for r in rows],
    })


def score_mme(bench: Benchmark, predictions: dict) -> Scored:
    """MME_rating: per subtask acc (rows right) + acc+ (images with both questions right), in percent, and the
    perception and reasoning sums. One row: perception, reasoning, then the subtasks in file order."""
    v = verdicts(bench, predictions)
    detail, notes = [], []
    for category, part in v.groupby("category", sort=False):
        pairs = [list(g["score"]) for _, g in part.groupby("image_path", sort=False)]
        short = next((path for path, g in part.groupby("image_path", sort=False) if len(g) < 2), None)
        if short is not None:
            raise UserError(f"{bench.file}: MME scores each image's two questions together (acc+), but image_path "
                            f"{short!r} ({category}) has one predicted row; predict or keep both")
        acc, acc_plus = np.mean(part["score"]) * 100, np.mean([p[0] * p[1] for p in pairs]) * 100  # first two only
        detail.append({"category": category, "acc": acc, "acc+": acc_plus, "score": acc + acc_plus})
    scores = {d["category"]: d["score"] for d in detail}
    table = {}
    for group, members in MME_GROUPS.items():
        present = [c for c in members if c in scores]
        table[group] = sum(scores[c] for c in present) if present else float("nan")
        if 0 < len(present) < len(members):  # VLMEvalKit raises KeyError here; the sum of what there is is shown
            notes.append(f"MME {group} sums {len(present)} of its {len(members)} subtasks (the others are not in "
                         "the file): not comparable with published totals")
    table.update(scores)
    headline = [(g, float(table[g]), MME_FULL[g]) for g in MME_GROUPS]
    return Scored(pd.DataFrame([table]), v[["index", "extracted", "score"]], headline,
                  details={"acc": pd.DataFrame(detail)}, notes=notes)


def score_pope(bench: Benchmark, predictions: dict) -> Scored:
    """POPE_rating: a row listed under several splits ('adversarial,popular') counts once in each, Overall
    included; per split F1 (the 'Overall' column), accuracy, precision, recall, in percent; Unknown is not Yes."""
    v = verdicts(bench, predictions)
    exploded = v.assign(category=[str(c).split(",") if not pd.isna(c) else [c] for c in v["category"]])
    exploded = exploded.explode("category")
    rows = [{"split": "Overall", **_pope_numbers(exploded)}]
    for split in sorted({c for c in exploded["category"] if not pd.isna(c)}):  # VLMEvalKit: set order
        rows.append({"split": split, **_pope_numbers(exploded[exploded["category"] == split])})
    table = pd.DataFrame(rows)
    return Scored(table, v[["index", "extracted", "score"]], [("Overall (F1)", float(table["Overall"].iloc[0]), 100.0)])


def _pope_numbers(part: pd.DataFrame) -> dict:
    """F1 as 'Overall', acc, precision, recall (percent) with 'Yes' as the positive class."""
    truth, pred = (part["answer"] == "Yes").to_numpy(), (part["extracted"] == "Yes").to_numpy()
    tp, fp, fn = int(np.sum(truth & pred)), int(np.sum(~truth & pred)), int(np.sum(truth & ~pred))
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    return {"Overall": f1 * 100, "acc": np.mean(part["score"]) * 100, "precision": precision * 100,
            "recall": recall * 100}


def _hallusion_ids(row: Row) -> tuple[str, str, str]:
    """(set_id, figure_id, question_id): fields 3, 4, 5 of the index split at '_' (Hallusion_rating)."""
    parts = str(row.index).split("_")
    if len(parts) < 6:
        raise UserError(f"{row.where()}: a HallusionBench index names its set, figure and question as fields "
                        "4-6 of '_'-separated text (VLMEvalKit's file); this one has fewer")
    return parts[3], parts[4], parts[5]


def score_hallusion(bench: Benchmark, predictions: dict) -> Scored:
    """Hallusion_rating: aAcc (rows), fAcc (figures with every question right), qAcc (questions right on every
    figure), in percent, for Overall, each category, then each l2-category (each sorted)."""
    v = verdicts(bench, predictions)
    by_index = {r.index: r for r in bench.rows}
    ids = [_hallusion_ids(by_index[i]) for i in v["index"]]
    v["figure_key"] = [f"{l2}_{s}_{f}" for l2, (s, f, _) in zip(v["l2-category"], ids)]
    v["question_key"] = [f"{l2}_{s}_{q}" for l2, (s, _, q) in zip(v["l2-category"], ids)]
    rows = [{"split": "Overall", **_hallusion_numbers(v)}]
    for column in ("category", "l2-category"):
        if column in bench.table.columns:
            for value in sorted({str(c) for c in v[column]}):  # VLMEvalKit: set order
                rows.append({"split": value, **_hallusion_numbers(v[v[column].astype(str) == value])})
    table = pd.DataFrame(rows)
    headline = [(m, float(table[m].iloc[0]), 100.0) for m in ("aAcc", "fAcc", "qAcc")]
    return Scored(table, v[["index", "extracted", "score"]], headline)


def _hallusion_numbers(part: pd.DataFrame) -> dict:
    """aAcc, fAcc, qAcc of some rows, percent."""
    def all_right(key: str) -> float:
        groups = defaultdict(list)
        for k, s in zip(part[key], part["score"]):
            groups[k].append(s)
        return np.mean([all(g) for g in groups.values()]) * 100

    return {"aAcc": np.mean(part["score"]) * 100, "fAcc": all_right("figure_key"), "qAcc": all_right("question_key")}
