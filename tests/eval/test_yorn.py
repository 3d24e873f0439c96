"""Yes/no scoring (MME, POPE, HallusionBench) against VLMEvalKit e8e78f0, rule by rule.

Each expected value is worked out by hand from VLMEvalKit's code; the reasoning is in the test. References:
  yorn.py        vlmeval/dataset/utils/yorn.py: MME_rating 50-93, Hallusion_rating 96-145, POPE_rating 148-187,
                 YOrN_Extraction 254-261
  image_yorn.py  vlmeval/dataset/image_yorn.py: evaluate 41-109 (score = answer == extracted, line 91)
  misc.py        vlmeval/smp/misc.py:18-33 process_punctuation (applied after lowercasing)
"""
from __future__ import annotations

import pytest
from mmbench_tsv import write_tsv

from vlmtune.errors import UserError
from vlmtune.eval import yorn

COLUMNS = {"MME": ["index", "question", "answer", "category", "image_path", "image"],
           "POPE": ["index", "question", "answer", "category", "image"],
           "HallusionBench": ["index", "question", "answer", "category", "l2-category", "image"]}


def load(tmp_path, name, rows):
    return yorn.load_yorn(write_tsv(tmp_path / f"{name}.tsv", rows, COLUMNS[name]), name)


@pytest.mark.parametrize(("prediction", "expected", "why"), [
    ("Yes", "Yes", "the word yes, no 'no'"),
    ("Yes, it is.", "Yes", "', ' removes the comma, the period goes: words yes / it / is"),
    ("NO!", "No", "lowercased first; '!' becomes a space"),
    ("no.", "No", "a sentence period is removed"),
    ("Yes and no", "Unknown", "both words: Unknown"),
    ("yes-no", "Unknown", "'-' touches no space, so it becomes one: 'yes no', both words"),
    ("Yes.No", "Unknown", "a period between letters is deleted, not spaced: 'yesno' is neither word"),
    ("Nope", "Unknown", "words are compared whole"),
    ("I cannot answer that.", "Unknown", "a refusal names neither word"),
    ("", "Unknown", "the empty answer"),
])
def test_yorn_extraction(prediction, expected, why):
    assert yorn.yorn_extraction(prediction) == expected, why


def mme_rows(images):
    """existence: image e1 both right, e2 one right; code_reasoning c1 none right; count: one image, 3 questions."""
    spec = [("existence", "e1", "Yes"), ("existence", "e1", "No"), ("existence", "e2", "Yes"), ("existence", "e2", "No"),
            ("code_reasoning", "c1", "Yes"), ("code_reasoning", "c1", "No"),
            ("count", "n1", "Yes"), ("count", "n1", "No"), ("count", "n1", "Yes")]
    return [dict(index=i, question=f"q{i}? Please answer yes or no.", answer=a, category=c, image_path=f"{c}/{p}.jpg",
                 image=images[0] if i == 0 else "0") for i, (c, p, a) in enumerate(spec)]


def test_mme_acc_and_acc_plus_per_subtask_and_sums(tmp_path, images):
    """MME_rating (yorn.py:50-93): per subtask acc (rows right, %) + acc+ (images whose FIRST TWO questions are
    both right, %: `val[0] * val[1]`, line 70).
    existence: rows 3/4 -> 75, images e1 both right, e2 not -> 50: 125.
    code_reasoning: 'yes and no' is Unknown, 'None' is read as NaN -> 'nan' -> Unknown: 0 + 0.
    count: rows 2/3 -> 66.67; its one image has 3 questions, only the first two (both right) count -> 100.
    perception sums existence and count (the subtasks present), reasoning is code_reasoning."""
    bench = load(tmp_path, "MME", mme_rows(images))
    predictions = {0: "Yes", 1: "No", 2: "No", 3: "no.", 4: "yes and no", 5: "None", 6: "yes", 7: "no", 8: "no"}
    scored = yorn.score_mme(bench, predictions)
    row = scored.table.iloc[0].to_dict()
    assert list(scored.table.columns) == ["perception", "reasoning", "existence", "code_reasoning", "count"]
    assert row == pytest.approx({"perception": 125 + 100 * 2 / 3 + 100, "reasoning": 0.0, "existence": 125.0,
                                 "code_reasoning": 0.0, "count": 100 * 2 / 3 + 100})
    acc = scored.details["acc"].set_index("category")
    assert acc.loc["existence", "acc"] == 75.0 and acc.loc["existence", "acc+"] == 50.0
    assert list(scored.per_row["extracted"]) == ["Yes", "No", "No", "No", "Unknown", "Unknown", "Yes", "No", "No"]
    assert [h[0] for h in scored.headline] == ["perception", "reasoning"]
    assert any("perception sums 2 of its 10 subtasks" in n for n in scored.notes)


def test_mme_refuses_an_image_with_one_predicted_question(tmp_path, images):
    """acc+ reads val[1] (yorn.py:70): VLMEvalKit fails with IndexError; here it is one line naming the image."""
    bench = load(tmp_path, "MME", mme_rows(images))
    with pytest.raises(UserError, match=r"image_path 'existence/e2.jpg' \(existence\) has one predicted row"):
        yorn.score_mme(bench, {0: "Yes", 1: "No", 2: "Yes"})


def test_pope_counts_a_row_once_per_split_it_names(tmp_path, images):
    """POPE_rating (yorn.py:148-187) explodes 'adversarial,popular' into two rows (line 160) BEFORE the Overall
    numbers, so such a row counts twice in Overall. 'Yes' is the positive class; Unknown counts as not Yes.
    rows: 0 Yes/'Yes' TP (adversarial); 1 No/'Yes' FP (adversarial AND popular); 2 Yes/'I don't know' FN
    (popular); 3 No/'No' TN (random).
    Overall over 5 exploded rows: TP 1, FP 2, FN 1 -> precision 1/3, recall 1/2, F1 0.4; acc 2/5.
    adversarial: TP, FP -> P 1/2, R 1 -> F1 2/3; acc 1/2.  popular: FP, FN -> F1 0 (P = R = 0); acc 0.
    random: TN only -> P and R guarded to 0 -> F1 0; acc 100. F1 is the column named 'Overall' (line 167)."""
    cats = ["adversarial", "adversarial,popular", "popular", "random"]
    rows = [dict(index=i, question="Is there a cat?", answer=a, category=c, image=images[0])
            for i, (a, c) in enumerate(zip(["Yes", "No", "Yes", "No"], cats))]
    scored = yorn.score_pope(load(tmp_path, "POPE", rows), {0: "Yes", 1: "Yes", 2: "I don't know", 3: "No"})
    table = scored.table.set_index("split")
    assert list(scored.table.columns) == ["split", "Overall", "acc", "precision", "recall"]
    assert list(table.index) == ["Overall", "adversarial", "popular", "random"]
    assert table.loc["Overall"].tolist() == pytest.approx([40.0, 40.0, 100 / 3, 50.0])
    assert table.loc["adversarial"].tolist() == pytest.approx([200 / 3, 50.0, 50.0, 100.0])
    assert table.loc["popular"].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert table.loc["random"].tolist() == pytest.approx([0.0, 100.0, 0.0, 0.0])
    assert scored.headline == [("Overall (F1)", pytest.approx(40.0), 100.0)]


def test_hallusionbench_question_and_figure_accuracy(tmp_path, images):
    """Hallusion_rating (yorn.py:96-145): set, figure and question ids are fields 4, 5, 6 of the index split at
    '_' (lines 117-119); fAcc groups rows by l2-category + set + figure, qAcc by l2-category + set + question, and
    a group counts when all its rows are right.
    chart rows (set 0): fig0/q0 right, fig0/q1 right, fig1/q0 wrong, fig1/q1 right -> aAcc 3/4;
    figures {fig0: right, fig1: wrong} -> 50; questions {q0: wrong, q1: right} -> 50.
    map row (same ids, other l2-category: its own groups) right.
    Overall: aAcc 4/5 = 80; fAcc 2 of 3 groups; qAcc 2 of 3 groups. Then each category, then each l2-category."""
    spec = [("VD", "chart", 0, 0, "Yes", "Yes"), ("VD", "chart", 0, 1, "No", "No"), ("VD", "chart", 1, 0, "No", "Yes"),
            ("VD", "chart", 1, 1, "Yes", "Yes"), ("VS", "map", 0, 0, "No", "no")]
    rows = [dict(index=f"{cat}_{l2}_{i}_0_{fig}_{q}", question="q?", answer=a, category=cat, image=images[i % 4],
                 **{"l2-category": l2}) for i, (cat, l2, fig, q, a, _) in enumerate(spec)]
    bench = load(tmp_path, "HallusionBench", rows)
    assert [r.index for r in bench.rows][0] == "VD_chart_0_0_0_0"  # text indices stay text
    scored = yorn.score_hallusion(bench, {r["index"]: p[-1] for r, p in zip(rows, spec)})
    table = scored.table.set_index("split")
    assert list(table.index) == ["Overall", "VD", "VS", "chart", "map"]
    assert table.loc["Overall"].tolist() == pytest.approx([80.0, 200 / 3, 200 / 3])
    assert table.loc["VD"].tolist() == pytest.approx([75.0, 50.0, 50.0]) == table.loc["chart"].tolist()
    assert table.loc["map"].tolist() == pytest.approx([100.0, 100.0, 100.0])


def test_hallusionbench_index_without_the_id_fields_is_refused(tmp_path, images):
    rows = [dict(index="VD_chart_1", question="q?", answer="Yes", category="VD", image=images[0],
                 **{"l2-category": "chart"})]
    with pytest.raises(UserError, match=r"row 1 \(index VD_chart_1\): a HallusionBench index names"):
        load(tmp_path, "HallusionBench", rows)


def test_answers_must_be_yes_or_no_as_written(tmp_path, images):
    """image_yorn.py:91 compares the answer cell with 'Yes'/'No' case-sensitively: a 'yes' answer could never
    score, so it is refused before the model loads."""
    rows = [dict(index=0, question="q?", answer="yes", category="random", image=images[0])]
    with pytest.raises(UserError, match=r"POPE\.tsv: row 1 \(index 0\): answer 'yes' must be Yes or No"):
        load(tmp_path, "POPE", rows)


def test_yorn_prompt_is_the_question_alone(tmp_path, images):
    """ImageYORNDataset.build_prompt adds nothing for MME/POPE/HallusionBench (image_yorn.py:31-38: AMBER only)."""
    bench = load(tmp_path, "MME", mme_rows(images))
    assert yorn.yorn_prompt(bench.rows[0]) == "<image>\nq0? Please answer yes or no."
