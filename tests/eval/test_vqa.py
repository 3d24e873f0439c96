"""VQA scoring (TextVQA, GQA, ChartQA, DocVQA, OCRBench) against VLMEvalKit e8e78f0, rule by rule.

Each expected value is worked out by hand from VLMEvalKit's code; the reasoning is in the test. References:
  misc.py       vlmeval/smp/misc.py:18-33 process_punctuation
  vqa_eval.py   vlmeval/dataset/utils/vqa_eval.py: _process_digit_article 12-160, hit_calculate 163-171,
                relaxed_correctness 175-214, anls_compute 233-239, process_answer 242-248, process_line 251-288
  image_vqa.py  vlmeval/dataset/image_vqa.py: ImageVQADataset.build_prompt 64-69, evaluate_heuristic 78-135,
                OCRBench.evaluate 509-571
"""
from __future__ import annotations

import pandas as pd
import pytest
from mmbench_tsv import write_tsv

from vlmtune.errors import UserError
from vlmtune.eval import vqa

TEXTVQA_ANSWERS = ["red"] * 6 + ["dark red"] * 3 + ["crimson"]


def load(tmp_path, name, rows, columns=("index", "question", "answer", "category", "image")):
    return vqa.load_vqa(write_tsv(tmp_path / f"{name}.tsv", rows, list(columns)), name)


# ---- process_punctuation: misc.py:18-33 -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected", "why"), [
    ("a,b", "a b", "a mark with no space beside it anywhere becomes a space (line 31)"),
    ("a, b", "a b", "',' is followed by a space somewhere in the text, so every ',' is removed (line 28-29)"),
    ("x-ray, a-b", "x ray a b", "per mark: ', ' removes commas, '-' never touches a space so it becomes a space"),
    ("1,000 a-b", "1000 ab", "a digit,digit comma anywhere removes EVERY mark, '-' included (line 28)"),
    ("e.g. 3.5", "eg 3.5", "a period not between digits is removed, 3.5 keeps its point (periodStrip, line 26)"),
    ("!!!", "   ", "'!' never touches a space, so each becomes one; nothing strips them here"),
])
def test_process_punctuation(text, expected, why):
    assert vqa.process_punctuation(text) == expected, why


def test_process_punctuation_removes_at_most_32_periods():
    """Line 32 calls periodStrip.sub('', outText, re.UNICODE): the third positional argument of Pattern.sub is
    `count`, and re.UNICODE == 32, so only the first 32 sentence periods go."""
    assert vqa.process_punctuation("." * 40) == "." * 8
    assert vqa.process_punctuation("a." * 33) == "a" * 32 + "a."


# ---- process_answer: vqa_eval.py:242-248 and _process_digit_article 12-160 ---------------------------------------


@pytest.mark.parametrize(("text", "expected", "why"), [
    ("Two dogs.", "2 dogs", "period removed, lowercased, number word -> digit (manualMap)"),
    ("The cat", "cat", "articles a/an/the dropped after lowercasing"),
    ("None", "0", "'none' is in manualMap: it becomes '0' like 'zero'"),
    ("dont", "don't", "contractions restored"),
    ("Im here", "im here", "the 'Im' key has a capital: looked up after lower() it never matches"),
    ("  a\tan\nthe  ", "", "tabs/newlines become spaces, then every word is an article"),
])
def test_process_answer(text, expected, why):
    assert vqa.process_answer(text) == expected, why


# ---- TextVQA: VQA accuracy, process_line 'vqa_score' 257-270, hit_calculate 164-165 ------------------------------


@pytest.mark.parametrize(("prediction", "expected", "why"), [
    ("Red.", 1.0, "normalises to 'red'; leaving out any one answer, >= 5 'red' remain: min(1, 5/3) = 1 each"),
    ("dark red", 0.9, "6 'red' rows see 3 other 'dark red' -> 1; 3 'dark red' rows see 2 -> 2/3; 'crimson' sees "
                      "3 -> 1: (6 + 2 + 1) / 10"),
    ("crimson", 0.3, "the 'crimson' row sees 0 others -> 0; the 9 others see 1 -> 1/3: 3 / 10"),
    ("a red", 1.0, "the article goes: 'red'"),
    ("", 0.0, "the empty answer matches nothing"),
])
def test_textvqa_accuracy(prediction, expected, why):
    assert vqa.hit("vqa_score", vqa.matches("vqa_score", TEXTVQA_ANSWERS, prediction)) == pytest.approx(expected), why


# ---- GQA: process_line 'accuracy' 279-282 (strip + lower only), hit_calculate default mean 170-171 ----------------


@pytest.mark.parametrize(("prediction", "expected", "why"), [
    (" Yes ", 1.0, "strip() and lower() on both sides"),
    ("Yes.", 0.0, "no punctuation removal for GQA: 'yes.' != 'yes'"),
    ("the yes", 0.0, "no article removal either"),
])
def test_gqa_exact_match(prediction, expected, why):
    assert vqa.hit("accuracy", vqa.matches("accuracy", ["yes"], prediction)) == expected, why


# ---- ChartQA: relaxed_correctness 175-214, hit = max over answers (168-169) --------------------------------------


@pytest.mark.parametrize(("target", "prediction", "expected", "why"), [
    ("12", "12.5", True, "|12.5 - 12| / 12 = 0.042 <= 0.05"),
    ("12", "13", False, "1 / 12 = 0.083 > 0.05"),
    ("0.05", "5%", True, "a trailing % divides by 100: 0.05 vs 0.05"),
    ("0", "0.0", False, "a target of 0 is falsy (line 210): the texts are compared, '0.0' != '0'"),
    ("12", "12 apples", False, "a number with a unit does not parse as a float: text comparison fails"),
    ("Yes", "yes", True, "text answers compare ignoring case"),
])
def test_chartqa_relaxed_correctness(target, prediction, expected, why):
    assert vqa.relaxed_correctness(target, prediction) is expected, why


def test_chartqa_row_is_right_when_any_answer_is():
    assert vqa.hit("relaxed_accuracy", vqa.matches("relaxed_accuracy", ["7", "seven"], " Seven ")) == 1.0


# ---- DocVQA: ANLS, anls_compute 233-239, hit_calculate 166-167 ----------------------------------------------------


@pytest.mark.parametrize(("answers", "prediction", "expected", "why"), [
    (["Hello World"], "hello  world", 1.0, "lowercased and whitespace-collapsed: distance 0"),
    (["Hello World"], "hello wor", 1 - 2 / 11, "2 edits over the longer length 11: 0.818 >= 0.5 is kept"),
    (["Hello World"], "help", 0.0, "8 edits / 11: 1 - 0.727 < 0.5 -> 0"),
    (["a  b"], "a c", 0.75, "1 edit between 'a b' and 'a c', divided by the RAW length of 'a  b' (4), not 3"),
    (["nope", "Hello World"], "hello world", 1.0, "the best answer counts: 1 - min(distance)"),
    (["abc"], "", 0.0, "the empty answer: distance 3 / 3 -> 0"),
])
def test_docvqa_anls(answers, prediction, expected, why):
    assert vqa.hit("anls", vqa.matches("anls", answers, prediction)) == pytest.approx(expected), why


# ---- tables: evaluate_heuristic 108-131 ---------------------------------------------------------------------------


def test_vqa_table_overall_then_sorted_categories_in_percent(tmp_path, images):
    """No split column: Overall first, then each category, sorted (lines 121-129); percent; no rounding
    (`ret.round(2)` on line 131 is discarded)."""
    rows = [dict(index=i, question=f"q{i}", answer=repr(TEXTVQA_ANSWERS), category=c, image=images[0])
            for i, c in enumerate(["zeta", "alpha", "alpha"])]
    bench = load(tmp_path, "TextVQA_VAL", rows)
    scored = vqa.score_vqa(bench, {0: "red", 1: "dark red", 2: "crimson"})
    assert list(scored.table.columns) == ["Overall", "alpha", "zeta"]
    assert scored.table.iloc[0].tolist() == pytest.approx([(1 + 0.9 + 0.3) / 3 * 100, 60.0, 100.0])
    assert scored.headline == [("Overall", pytest.approx(220 / 3), 100.0)]
    assert list(scored.per_row["eval_pred"]) == ["red", "dark red", "crimson"]


def test_vqa_table_with_split_lists_splits_then_overall(tmp_path, images):
    """With a split column: each split, then Overall (lines 110-119); categories are not reported then."""
    rows = [dict(index=i, question="q", answer="yes", category="c", split=s, image=images[0])
            for i, s in enumerate(["val", "test", "val"])]
    bench = load(tmp_path, "GQA_TestDev_Balanced", rows, ("index", "question", "answer", "category", "split", "image"))
    scored = vqa.score_vqa(bench, {0: "yes", 1: "no", 2: "no"})
    assert list(scored.table.columns) == ["test", "val", "Overall"]
    assert scored.table.iloc[0].tolist() == pytest.approx([0.0, 50.0, 100 / 3])


def test_missing_answers_and_predictions_are_scored_as_nan_like_vlmevalkit(tmp_path, images):
    """VLMEvalKit reads the TSV and its prediction xlsx with pandas' defaults and scores str(cell): an answer cell
    'NA' and a prediction 'None' are both the text 'nan' (image_vqa.py:84-85). So a model answering 'None' to a
    GQA question whose answer is 'NA' scores, and one answering 'none' does not."""
    rows = [dict(index=0, question="q", answer="NA", category="c", image=images[0])]
    bench = load(tmp_path, "GQA_TestDev_Balanced", rows)
    assert vqa.score_vqa(bench, {0: "None"}).per_row["hit"].tolist() == [1.0]
    assert vqa.score_vqa(bench, {0: "none"}).per_row["hit"].tolist() == [0.0]


def test_answer_lists_are_read_as_literals_and_code_is_refused(tmp_path, images):
    """process_line runs eval() on a list-looking answer (vqa_eval.py:253-254); here only a Python or JSON list
    literal is read, anything else is one line naming the file and row."""
    ok = load(tmp_path, "DocVQA_VAL", [dict(index=0, question="q", answer='["a", "b"]', category="c", image=images[0])])
    assert vqa.row_answers(ok.rows[0]) == ["a", "b"]
    rows = [dict(index=5, question="q", answer="[__import__('os').getcwd()]", category="c", image=images[0])]
    with pytest.raises(UserError, match=r"DocVQA_VAL\.tsv: row 1 \(index 5\): cell .* not a Python or JSON list"):
        load(tmp_path, "DocVQA_VAL", rows)


def test_vqa_prompt_adds_the_short_answer_instruction(tmp_path, images):
    """ImageVQADataset.build_prompt (image_vqa.py:64-69); the image goes first (ImageBaseDataset.build_prompt)."""
    bench = load(tmp_path, "TextVQA_VAL", [dict(index=0, question="What is written?", answer="x", category="c",
                                                 image=images[0])])
    assert vqa.vqa_prompt(bench.rows[0]) == "<image>\nWhat is written?\nAnswer the question using a single word or phrase."


# ---- OCRBench: image_vqa.py:509-571 ---------------------------------------------------------------------------


def test_ocrbench_containment_rules():
    """Right when some answer is contained in the prediction, both lowercased and stripped (540-546);
    handwritten formulas compare with every space removed and case kept (531-539)."""
    assert vqa.ocrbench_hit("Doc-oriented VQA", ["Hello"], "The text says HELLO.")
    assert not vqa.ocrbench_hit("Doc-oriented VQA", ["x ^ 2"], "x^2")
    assert vqa.ocrbench_hit(vqa.HME, ["x ^ 2"], "it is x^2")
    assert not vqa.ocrbench_hit(vqa.HME, ["X^2"], "x^2")  # no lowercasing for formulas
    assert vqa.ocrbench_hit("Doc-oriented VQA", ["a\nb"], "A B")  # an inner newline becomes a space


def test_ocrbench_scores_are_counts_with_text_recognition_summed(tmp_path, images):
    """Six recognition categories sum into 'Text Recognition'; 'Final Score' is the hit count, 'Final Score Norm'
    that over 10 whatever the row count (lines 553-571)."""
    cats = ["Regular Text Recognition", "Digit String Recognition", "Doc-oriented VQA", vqa.HME]
    rows = [dict(index=i, question="q", answer=repr(["abc"]), category=c, image=images[0]) for i, c in enumerate(cats)]
    bench = load(tmp_path, "OCRBench", rows)
    scored = vqa.score_ocrbench(bench, {0: "ABC", 1: "abc", 2: "no", 3: "a b c"})
    table = scored.table.iloc[0].to_dict()
    assert table["Text Recognition"] == 2 and table["Doc-oriented VQA"] == 0 and table[vqa.HME] == 1
    assert table["Final Score"] == 3 and table["Final Score Norm"] == 0.3
    assert list(scored.table.columns) == ["Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
                                          "Key Information Extraction", vqa.HME, "Final Score", "Final Score Norm"]


def test_ocrbench_refuses_answers_that_are_not_lists_and_unknown_categories(tmp_path, images):
    """OCRBench.evaluate eval()s every answer cell and indexes a fixed table by category (lines 529, 543)."""
    with pytest.raises(UserError, match=r"row 1 \(index 0\): OCRBench answers are a list literal"):
        load(tmp_path, "OCRBench", [dict(index=0, question="q", answer="abc", category=vqa.HME, image=images[0])])
    with pytest.raises(UserError, match="is not one of its 10 categories"):
        load(tmp_path, "OCRBench", [dict(index=0, question="q", answer="['a']", category="Other", image=images[0])])


def test_per_row_sheet_columns_follow_file_order(tmp_path, images):
    rows = [dict(index=i, question="q", answer=repr(["x"]), category="c", image=images[0]) for i in (3, 1, 2)]
    scored = vqa.score_vqa(load(tmp_path, "DocVQA_VAL", rows), {2: "x", 3: "y"})
    assert list(scored.per_row["index"]) == [3, 2]  # file order, the unpredicted row left out
    assert isinstance(scored.per_row, pd.DataFrame) and list(scored.per_row["hit"]) == [0.0, 1.0]
