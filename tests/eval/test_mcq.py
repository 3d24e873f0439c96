"""Plain multiple choice (SEEDBench_IMG, MMStar, ScienceQA, AI2D, MMMU) against VLMEvalKit e8e78f0.

Each expected value is worked out by hand from VLMEvalKit's code; the reasoning is in the test. References:
  matching_util.py     vlmeval/utils/matching_util.py: can_infer_option 18-61, can_infer_text 107-121, can_infer 124-127
  multiple_choice.py   vlmeval/dataset/utils/multiple_choice.py: MMMU_preproc 62-74, report_acc 77-100,
                       extract_answer_from_item 359-383 ('Z' without a judge, line 383), mcq_vanilla_eval 475-507
  image_mcq.py         vlmeval/dataset/image_mcq.py: evaluate_heuristic 255-378
  llava.py             vlmeval/vlm/llava/llava.py: LLaVA.build_prompt 92-126 (the prompt of every MCQ set)
"""
from __future__ import annotations

import pytest
from mmbench_tsv import write_tsv

from vlmtune.errors import UserError
from vlmtune.eval import mcq

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category", "split", "image"]
FIVE = dict(A="cat", B="dog", C="bird", D="fish", E="horse")


def load(tmp_path, name, rows, columns=COLUMNS):
    return mcq.load_mcq(write_tsv(tmp_path / f"{name}.tsv", rows, columns), name)


def five_option_rows(images, answers):
    return [dict(index=10 + i, question=f"Which animal? ({i})", **FIVE, answer=a, category=("zoo", "farm")[i % 2],
                 split="val", image=images[i % 4], **{"l2-category": "coarse_perception"})
            for i, a in enumerate(answers)]


@pytest.mark.parametrize(("prediction", "answer", "hit", "why"), [
    ("E", "E", 1, "a lone letter token; E is an option of this row (options up to what the row has)"),
    ("The answer is (E).", "E", 1, "punctuation .()[],:;!*#{} becomes spaces; E is the 4th of 4 tokens, within the "
                                   "last 4 (index > len - 5)"),
    ("horse", "E", 1, "no letter token: can_infer_text finds the one option text it contains"),
    ("A cat sits on the mat in the picture", "A", 1, "A is token 0 of 9, not in the last 4, but the text (36 chars) "
                                                     "is within twice the options' length (2 x 19): 'cat' -> A"),
    ("A cat sits on the mat in the picture, I think", "A", 0, "45 chars > 38: no text match either: 'Z'"),
    ("Cannot determine the answer", "A", 0, "a known refusal is 'Z' (matching_util.py:24-30)"),
    ("B or C", "B", 0, "two option letters: not one answer, and no option text: 'Z'"),
    ("", "A", 0, "the empty answer matches nothing: 'Z' (exact matching has no judge to ask, line 383)"),
    ("None", "A", 0, "pandas reads a 'None' prediction back as NaN; str() makes it 'nan', which matches nothing"),
])
def test_letter_extraction_and_hit(tmp_path, images, prediction, answer, hit, why):
    bench = load(tmp_path, "ScienceQA_VAL", five_option_rows(images, [answer]))
    scored = mcq.score_mcq(bench, {10: prediction})
    assert scored.per_row["hit"].tolist() == [hit], why
    if not hit:
        assert scored.per_row["extracted"].tolist() != [answer]


def test_report_acc_table_per_split_l2_and_category(tmp_path, images):
    """report_acc (multiple_choice.py:77-100): one row per split; Overall, then each l2-category (MMBench's
    abbreviations: coarse_perception -> CP), then each category, sorted; fractions, not percent.
    rows 10 (zoo) right, 11 (farm) wrong, 12 (zoo) right, 13 (farm) right: Overall 3/4, zoo 1, farm 1/2."""
    bench = load(tmp_path, "SEEDBench_IMG", five_option_rows(images, ["A", "B", "C", "D"]))
    scored = mcq.score_mcq(bench, {10: "A", 11: "A", 12: "C.", 13: "fish"})
    assert list(scored.table.columns) == ["split", "Overall", "CP", "farm", "zoo"]
    assert scored.table.iloc[0].to_dict() == {"split": "val", "Overall": 0.75, "CP": 0.75, "farm": 0.5, "zoo": 1.0}
    assert scored.headline == [("Overall", 0.75, 1.0)]


def test_mmmu_open_questions_become_answer_vs_other_answers(tmp_path, images):
    """MMMU_preproc (multiple_choice.py:62-74): a row without option A gets A = its answer text, B = 'Other
    Answers'; mcq_vanilla_eval maps every answer that is not a capital letter to 'A' (line 483).
    row 0 open, answer 42, predicted '42': no letter token, text '42' contains option A's text -> A: right.
    row 1 options, answer B, predicted 'B': right.
    row 2 open, answer 7, predicted 'The answer is 8': no letter, no option text inside -> Z: wrong.
    splits dev {1} and validation {0, 2}: the headline is validation's Overall (image_base.py:17-51 prefers
    test > validation > val > dev), 0.5, not dev's 1.0."""
    rows = [dict(index=0, question="How many? <image 1>", answer="42", split="validation", image=images[0]),
            dict(index=1, question="Which?", A="x", B="y", C="z", answer="B", split="dev", image=images[1]),
            dict(index=2, question="Sum?", answer="7", split="validation", image=images[2])]
    bench = load(tmp_path, "MMMU_DEV_VAL", rows, ["index", "question", "A", "B", "C", "answer", "split", "image"])
    scored = mcq.score_mcq(bench, {0: "42", 1: "B", 2: "The answer is 8"})
    assert scored.per_row["extracted"].tolist() == ["A", "B", "Z"]
    assert scored.table.set_index("split")["Overall"].to_dict() == {"dev": 1.0, "validation": 0.5}
    assert scored.headline == [("Overall", 0.5, 1.0)]
    # the prompt of an open question: the LLaVA wrapper's 'Answer the question directly.' (llava.py:117-122);
    # MMMU's '<image 1>' marker stays text (that wrapper does not interleave images)
    assert mcq.mcq_row_prompt(bench.rows[0]) == "<image>\nHow many? <image 1>\nAnswer the question directly."


def test_prompt_is_the_llava_wrappers(tmp_path, images):
    """llava.py:97-116: hint + newline + question, one 'X. text' line per option the row has, the instruction."""
    rows = five_option_rows(images, ["A"])
    rows[0]["hint"] = "Look closely."
    bench = load(tmp_path, "AI2D_TEST", rows)
    assert mcq.mcq_row_prompt(bench.rows[0]) == (
        "<image>\nLook closely.\nWhich animal? (0)\nA. cat\nB. dog\nC. bird\nD. fish\nE. horse\n"
        "Answer with the option's letter from the given choices directly.")


def test_test_split_is_not_scored(tmp_path, images):
    rows = five_option_rows(images, [None, None])
    bench = load(tmp_path, "MMStar", rows, [c for c in COLUMNS if c != "answer"])
    assert mcq.score_mcq(bench, {10: "A", 11: "B"}) is None


@pytest.mark.parametrize(("change", "message"), [
    ({"answer": "cat"}, r"row 1 \(index 10\): answer 'cat' is not one of the row's option letters \(A, B, C, D, E\)"),
    ({"category": None}, r"row 1 \(index 10\): empty category"),
    ({"question": None}, r"row 1 \(index 10\): empty question"),
])
def test_bad_rows_are_one_line_errors(tmp_path, images, change, message):
    rows = five_option_rows(images, ["A", "B"])
    rows[0].update(change)
    with pytest.raises(UserError, match=message):
        load(tmp_path, "ScienceQA_TEST", rows)
