"""Short-answer benchmarks: VLMEvalKit's judge-free VQA scores, number for number.

    TextVQA_VAL           VQA accuracy: min(#other answers equal to the prediction / 3, 1) averaged over the 10
                          leave-one-out subsets, after VQA normalisation (`process_answer`)
    GQA_TestDev_Balanced  exact match after strip() and lower() only (VLMEvalKit's 'accuracy' method: no VQA
                          normalisation, so 'Yes.' does not match 'yes')
    ChartQA_TEST          relaxed accuracy: a number within 5% of the answer, else case-insensitive equality
    DocVQA_VAL            ANLS: 1 - normalised edit distance to the nearest answer, 0 below 0.5
    OCRBench              answer text contained in the prediction, per category; the sum of hits (of 1000)

Source: vlmeval/dataset/image_vqa.py (ImageVQADataset.evaluate_heuristic, OCRBench.evaluate) and
vlmeval/dataset/utils/vqa_eval.py at VLMEvalKit e8e78f0; the VQA normalisation is vlmeval/smp/misc.py
process_punctuation. Quirks kept on purpose (tests/eval/test_vqa.py derives each from that code):
- `process_punctuation` decides per mark from the *original* text (a mark next to a space anywhere, or a
  digit,digit comma anywhere, removes every such mark instead of turning it into a space), and removes at most 32
  sentence periods: `re.sub(..., re.UNICODE)` passes the flag as the count;
- the contractions map is looked up after lowercasing, so its 'Im'/'Ive'/"I'dve" keys never match;
- ANLS divides the distance between the whitespace-normalised lowercased texts by the longer *raw* length;
- the category/split tables round nothing (`ret.round(2)` is discarded).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from vlmtune.errors import UserError
from vlmtune.eval.bench_data import Benchmark, Row, Scored, load_benchmark
from vlmtune.eval.tsv import as_scored, literal_list

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # ImageVQADataset.build_prompt
# vqa_eval.py process_line's method and hit_calculate's aggregation, per benchmark
METHODS = {"TextVQA_VAL": "vqa_score", "GQA_TestDev_Balanced": "accuracy", "ChartQA_TEST": "relaxed_accuracy",
           "DocVQA_VAL": "anls"}
ANLS_THRESHOLD = 0.5
OCRBENCH_CATEGORIES = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition", "Handwriting Recognition",
    "Digit String Recognition", "Non-Semantic Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
    "Key Information Extraction", "Handwritten Mathematical Expression Recognition",
)
HME = "Handwritten Mathematical Expression Recognition"

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_CONTRACTIONS = {  # vqa_eval.py _process_digit_article; keys with capitals never match (looked up lowercased)
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


# ---- normalisation and per-answer matches ------------------------------------------------------------------


def process_punctuation(text: str) -> str:
    """vlmeval/smp/misc.py process_punctuation: each mark removed (if written next to a space anywhere, or if
    the text has a digit,digit comma) or else turned into a space; then at most 32 sentence periods removed."""
    out = text
    comma_number = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # VLMEvalKit passes re.UNICODE (== 32) as the count


def process_digit_article(text: str) -> str:
    """Lowercase words; number words -> digits; articles dropped; contractions restored (vqa_eval.py)."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def process_answer(text: str) -> str:
    """The VQA normalisation of an answer or a prediction (vqa_eval.py process_answer)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_matches(answers: list[str], prediction: str) -> list[float]:
    """Per answer: min(1, the other answers equal to the prediction / 3), all normalised."""
    gts, pred = [process_answer(a) for a in answers], process_answer(prediction)
    return [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA (pix2struct): a number within 5% of a non-zero target ('12%' is 0.12), else equal ignoring case."""

    def to_float(text: str) -> float | None:
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    pred_float, target_float = to_float(prediction), to_float(target)
    if pred_float is not None and target_float:  # a target of 0 falls back to text equality
        return abs(pred_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions)."""
    if len(a) > len(b):
        a, b = b, a
    distances = list(range(len(a) + 1))
    for i2, c2 in enumerate(b):
        new = [i2 + 1]
        for i1, c1 in enumerate(a):
            new.append(distances[i1] if c1 == c2 else 1 + min(distances[i1], distances[i1 + 1], new[-1]))
        distances = new
    return distances[-1]


def anls_distance(answer: str, prediction: str) -> float:
    """vqa_eval.py anls_compute: edit distance of the lowercased, whitespace-collapsed texts over the longer
    raw length (upper-cased, as VLMEvalKit measures it); 0.0 when both are empty."""
    dist = levenshtein(" ".join(answer.strip().lower().split()), " ".join(prediction.strip().lower().split()))
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else dist / length


def matches(method: str, answers: list[str], prediction: str) -> list[float]:
    """vqa_eval.py process_line's 'match' list for one row."""
    if method == "vqa_score":
        return vqa_matches(answers, prediction)
    if method == "anls":
        return [anls_distance(a, prediction) for a in answers]
    if method == "relaxed_accuracy":
        return [float(relaxed_correctness(a, prediction.strip())) for a in answers]
    return [1.0 if a.strip().lower() == prediction.strip().lower() else 0.0 for a in answers]  # accuracy


def hit(method: str, match: list[float]) -> float:
    """vqa_eval.py hit_calculate for one row: ANLS thresholded, ChartQA's best answer, else the mean."""
    if method == "anls":
        best = 1 - min(match)
        return 0.0 if best < ANLS_THRESHOLD else best
    if method == "relaxed_accuracy":
        return max(match)
    return float(np.mean(match))


# ---- loading, prompts, scoring ------------------------------------------------------------------------------


def row_answers(row: Row) -> list[str]:
    """The row's answers: a list literal's strings, else the one answer as pandas read it ('nan' if empty)."""
    cell = str(row.cells["answer"])  # VLMEvalKit: data['answer'] = [str(x) ...]
    listed = literal_list(cell, row.where())
    if listed is None:
        return [cell]
    if not listed or not all(isinstance(a, str) for a in listed):
        raise UserError(f"{row.where()}: the answer list must hold one or more strings, found {cell[:60]!r}")
    return listed


def load_vqa(path, name: str) -> Benchmark:
    """A VQA TSV (index, image, question, answer); every answer cell parses."""
    bench = load_benchmark(path, name, ("question", "answer"))
    for row in bench.rows:
        if row.text("question") is None:
            raise UserError(f"{row.where()}: empty question")
        answers = row_answers(row)
        if name == "OCRBench":
            _check_ocrbench(row, answers)
    return bench


def _check_ocrbench(row: Row, answers: list[str]) -> None:
    """OCRBench.evaluate runs `eval` on every answer cell and looks its category up in a fixed table."""
    if literal_list(str(row.cells["answer"]), row.where()) is None:
        raise UserError(f"{row.where()}: OCRBench answers are a list literal like ['text']; found {answers[0][:60]!r}")
    if row.text("category") not in OCRBENCH_CATEGORIES:
        raise UserError(f"{row.where()}: OCRBench category {row.text('category')!r} is not one of its 10 categories")


def vqa_prompt(row: Row) -> str:
    """ImageVQADataset.build_prompt: the question and the short-answer instruction, behind the image."""
    return "<image>\n" * len(row.images) + row.text("question") + SHORT_ANSWER


def plain_prompt(row: Row) -> str:
    """ImageBaseDataset.build_prompt (OCRBench): the question alone, behind the image."""
    return "<image>\n" * len(row.images) + row.text("question")


def score_vqa(bench: Benchmark, predictions: dict) -> Scored:
    """evaluate_heuristic: per-row matches, then Overall and each split (or each category), in percent."""
    method = METHODS[bench.name]
    rows = [r for r in bench.rows if r.index in predictions]
    results = [matches(method, row_answers(r), as_scored(predictions[r.index])) for r in rows]
    hits = [hit(method, m) for m in results]
    per_row = pd.DataFrame({
        "index": [r.index for r in rows],
        "eval_pred": [_eval_pred(method, as_scored(predictions[r.index])) for r in rows],
        "eval_match": [str(m) for m in results],
        "eval_score": [float(np.mean(m)) for m in results],
        "hit": hits,
    })
    table = pd.DataFrame([_vqa_table(rows, hits)])
    return Scored(table, per_row, [("Overall", float(table["Overall"].iloc[0]), 100.0)])


def _eval_pred(method: str, prediction: str) -> str:
    """What the prediction is compared as (VLMEvalKit's eval_pred column)."""
    if method == "vqa_score":
        return process_answer(prediction)
    return prediction if method == "anls" else prediction.strip()


def _vqa_table(rows: list[Row], hits: list[float]) -> dict:
    """One row, percent: each split then Overall when the file has a split column, else Overall then each
    category (sorted). Splits are sorted too (VLMEvalKit iterates a set: its order varies from run to run)."""
    def mean(keep) -> float:
        chosen = [h for r, h in zip(rows, hits) if keep(r)]
        return float(np.mean(chosen)) * 100 if chosen else float("nan")

    if rows and "split" in rows[0].cells:
        splits = sorted({str(r.cells["split"]) for r in rows})
        out = {sp: mean(lambda r, sp=sp: str(r.cells["split"]) == sp) for sp in splits}
        return {**out, "Overall": mean(lambda r: True)}
    out = {"Overall": mean(lambda r: True)}
    if rows and "category" in rows[0].cells:
        for c in sorted({str(r.cells["category"]) for r in rows}):
            out[c] = mean(lambda r, c=c: str(r.cells["category"]) == c)
    return out


def ocrbench_hit(category: str, answers: list[str], prediction: str) -> bool:
    """OCRBench.evaluate: some answer is contained in the prediction; handwritten formulas compare with every
    space removed, the rest lowercased (newlines become spaces after strip(), so an answer's inner newline counts)."""
    for answer in answers:
        if category == HME:
            if answer.strip().replace("\n", " ").replace(" ", "") in prediction.strip().replace("\n", " ").replace(" ", ""):
                return True
        elif answer.lower().strip().replace("\n", " ") in prediction.lower().strip().replace("\n", " "):
            return True
    return False


def score_ocrbench(bench: Benchmark, predictions: dict) -> Scored:
    """OCRBench.evaluate: hits per category, the six recognition categories summed as Text Recognition,
    Final Score (of 1000 rows) and Final Score Norm (/10)."""
    rows = [r for r in bench.rows if r.index in predictions]
    hits = [ocrbench_hit(r.text("category"), row_answers(r), as_scored(predictions[r.index])) for r in rows]
    per_category = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for r, h in zip(rows, hits):
        per_category[r.text("category")] += int(h)
    scores = {"Text Recognition": sum(per_category[c] for c in OCRBENCH_CATEGORIES[:6])}
    scores.update({c: per_category[c] for c in OCRBENCH_CATEGORIES[6:]})
    scores["Final Score"] = sum(scores.values())
    scores["Final Score Norm"] = float(scores["Final Score"]) / 10
    per_row = pd.DataFrame({"index": [r.index for r in rows], "hit": [int(h) for h in hits]})
    return Scored(pd.DataFrame([scores]), per_row, [("Final Score", float(scores["Final Score"]), 1000.0)])
