"""Multiple choice without CircularEval (SEEDBench_IMG, MMStar, ScienceQA, AI2D, MMMU, any TSV with options).

Prompt: VLMEvalKit's `LLaVA` wrapper builds its own for every MCQ set (vlmeval/vlm/llava/llava.py build_prompt,
the text of eval/prompt.py `mcq_prompt`): [hint] question, 'A. ...' per option, the letter instruction; a row's
images all go in front of the text (one `<image>` tag each). MMMU's questions keep their '<image 1>' markers as
text: that wrapper takes the images first and does not interleave them (MMMUDataset.split_MMMU is used only
through the dataset's own build_prompt).

Scoring: vlmeval/dataset/image_mcq.py evaluate_heuristic with exact matching (no judge) ->
utils/multiple_choice.py mcq_vanilla_eval: `can_infer` (eval/matchers.py) reads a letter from the answer, 'Z'
when it reads none; a row is right when that letter is its answer. report_acc gives the table (eval/scoring.py),
fractions. MMMU (MMMU_preproc): an open question (no option A) is scored as the choice between A = its answer
text and B = 'Other Answers', and every answer that is not a capital letter counts as 'A'.
"""
from __future__ import annotations

import string

import pandas as pd

from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.errors import UserError
from vlmtune.eval.bench_data import Benchmark, Row, Scored, load_benchmark
from vlmtune.eval.matchers import extract_answer
from vlmtune.eval.prompt import mcq_prompt
from vlmtune.eval.scoring import report_acc
from vlmtune.eval.tsv import as_scored

MMMU = "MMMU_DEV_VAL"
OPEN_OTHER = "Other Answers"  # MMMU_preproc's option B for an open question
SPLIT_PREFERENCE = ("test", "validation", "val", "dev", "none")  # image_base.py _choose_primary_metric_key


def options(row: Row) -> dict[str, str]:
    """Letter -> option text, in letter order, for the row's non-empty option cells."""
    return {c: row.text(c) for c in string.ascii_uppercase if row.text(c) is not None}


def has_answers(bench: Benchmark) -> bool:
    """False for a test split: no answer column, or an empty one."""
    return "answer" in bench.table.columns and bench.table["answer"].notna().any()


def load_mcq(path, name: str) -> Benchmark:
    """A multiple-choice TSV (index, image, question, A, B, ...); each row's answer one of its letters (MMMU:
    open questions without options too). Empty category/l2-category/split cells are refused: VLMEvalKit's table
    sorts those columns and fails on a missing cell."""
    bench = load_benchmark(path, name, ("question",) if name == MMMU else ("question", "A", "B"))
    answered = has_answers(bench)
    for row in bench.rows:
        _check_row(row, name, answered)
    return bench


def _check_row(row: Row, name: str, answered: bool) -> None:
    opts, answer = options(row), row.text("answer")
    if row.text("question") is None:
        raise UserError(f"{row.where()}: empty question")
    if name != MMMU and len(opts) < 2:
        raise UserError(f"{row.where()}: needs at least two options, found {len(opts)}")
    if answered and answer is None:
        raise UserError(f"{row.where()}: empty answer in a file that has answers")
    if answered and name != MMMU and answer not in opts:
        raise UserError(f"{row.where()}: answer {answer!r} is not one of the row's option letters "
                        f"({', '.join(opts)}); write the letter of the right option")
    for column in ("category", "l2-category", "split"):
        if column in row.cells and row.text(column) is None:
            raise UserError(f"{row.where()}: empty {column} (the accuracy table groups by it)")


def mcq_row_prompt(row: Row) -> str:
    """The LLaVA wrapper's MCQ prompt, one `<image>` tag per image in front."""
    extra_tags = f"{DEFAULT_IMAGE_TOKEN}\n" * (len(row.images) - 1)  # mcq_prompt writes the first
    return extra_tags + mcq_prompt(row.text("question"), options(row), row.text("hint"))


def choices_and_truth(row: Row, name: str) -> tuple[dict[str, str], str]:
    """The options `can_infer` sees and the right letter (mcq_vanilla_eval; MMBench-style sets: as written)."""
    opts, answer = options(row), row.text("answer")
    if name != MMMU:
        return opts, answer
    if "A" not in opts:  # MMMU_preproc: an open question becomes its answer vs 'Other Answers'
        opts = dict(sorted({**opts, "A": str(row.cells["answer"]), "B": OPEN_OTHER}.items()))
    return opts, answer if answer in list(string.ascii_uppercase) else "A"


def score_mcq(bench: Benchmark, predictions: dict) -> Scored | None:
    """Extract each predicted row's letter, then report_acc: Overall, L2 abilities, categories per split.
    None for a file without answers (a test split: its predictions are submitted, not scored)."""
    if not has_answers(bench):
        return None
    rows = [r for r in bench.rows if r.index in predictions]
    extracted, hits = [], []
    for r in rows:
        choices, truth = choices_and_truth(r, bench.name)
        letter = extract_answer(as_scored(predictions[r.index]), choices) or "Z"  # exact matching: 'Z' if none
        extracted.append(letter)
        hits.append(float(letter == truth))
    frame = pd.DataFrame({"hit": hits})
    for column in ("split", "l2-category", "category"):
        if column in bench.table.columns:
            frame[column] = [r.text(column) for r in rows]
    table = pd.DataFrame(report_acc(frame))
    per_row = pd.DataFrame({"index": [r.index for r in rows], "extracted": extracted, "hit": [int(h) for h in hits]})
    return Scored(table, per_row, [("Overall", headline_value(table), 1.0)])


def headline_value(table: pd.DataFrame) -> float:
    """Overall of the split VLMEvalKit reports first (test, validation, val, dev), else of the first split."""
    splits = list(table["split"])
    chosen = next((s for s in SPLIT_PREFERENCE if s in splits), splits[0])
    return float(table.loc[table["split"] == chosen, "Overall"].iloc[0])
