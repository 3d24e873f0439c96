"""Scoring (single pass, CircularEval, per ability), the report files, the predictions sheet, rescoring and
the resumable prediction log, on TSVs built with real JPEGs."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from mmbench_tsv import STRIDE, base_questions, rotations, write_tsv
from PIL import Image

from vlmtune.errors import UserError
from vlmtune.eval.mmbench_data import load_mmbench
from vlmtune.eval.results import finish_run, read_predictions, rescore
from vlmtune.eval.runner import PredictionStore, make_run_dir
from vlmtune.eval.scoring import score

WRONG = "I do not know"  # extracts to nothing with either matcher


def answers_with_mistakes(data):
    """Q0 right in every rotation; Q1 right except rotation 2; Q2 wrong in the original only."""
    predictions = {q.index: f"{q.answer}." for q in data.questions}
    predictions[2 * STRIDE + 1] = WRONG
    predictions[2] = WRONG
    return predictions


def row(table, eval_name):
    """The (single) split row of one eval as a dict."""
    return table[table["eval"] == eval_name].iloc[0].to_dict()


def test_single_and_circular_accuracy_per_ability(dev_tsv):
    data = load_mmbench(dev_tsv)
    report = score(data, answers_with_mistakes(data), "vlmevalkit")
    assert list(report.table.columns) == [
        "eval", "split", "Overall", "CP", "FP-S", "attribute_recognition", "image_scene", "image_topic"]
    single, circular = row(report.table, "single"), row(report.table, "circular")
    assert single == pytest.approx(dict(eval="single", split="dev", Overall=2 / 3, CP=0.5, **{"FP-S": 1.0},
                                        attribute_recognition=1.0, image_scene=1.0, image_topic=0.0))
    assert circular == pytest.approx(dict(eval="circular", split="dev", Overall=1 / 3, CP=0.5, **{"FP-S": 0.0},
                                          attribute_recognition=0.0, image_scene=1.0, image_topic=0.0))
    assert report.missing == 0 and len(report.verdicts) == 12
    assert sum(v.hit for v in report.verdicts) == 10


def test_missing_rotation_fails_its_question_in_circular_eval(dev_tsv):
    data = load_mmbench(dev_tsv)
    predictions = {q.index: q.answer for q in data.questions}
    del predictions[3 * STRIDE]  # question 0 loses its last rotation
    report = score(data, predictions, "vlmevalkit")
    assert report.missing == 1
    assert row(report.table, "circular")["Overall"] == pytest.approx(2 / 3)
    assert row(report.table, "single")["Overall"] == 1.0


def test_matcher_choice_changes_the_score(dev_tsv):
    data = load_mmbench(dev_tsv)
    # the option text restated: VLMEvalKit's text rule finds it, XTuner's capital-letter rule does not
    predictions = {q.index: q.options[q.answer] for q in data.questions}
    assert row(score(data, predictions, "vlmevalkit").table, "circular")["Overall"] == 1.0
    assert row(score(data, predictions, "xtuner").table, "circular")["Overall"] < 1.0


def test_ccbench_reports_categories_without_l2(tmp_path, images):
    rows = []
    for i, category in enumerate(["calligraphy_painting", "cultural_relic"]):
        q = dict(index=i, question=f"q{i}", A="x", B="y", C="z", answer="B", category=category, image=images[i])
        rows += rotations(q, 3, image_refs=True)
    data = load_mmbench(write_tsv(tmp_path / "CCBench.tsv", rows,
                                  columns=["index", "question", "A", "B", "C", "answer", "category", "image"]))
    predictions = {q.index: q.answer for q in data.questions}
    predictions[STRIDE + 1] = "Z"
    table = score(data, predictions, "vlmevalkit").table
    assert list(table.columns) == ["eval", "split", "Overall", "calligraphy_painting", "cultural_relic"]
    assert row(table, "circular") == pytest.approx(
        dict(eval="circular", split="none", Overall=0.5, calligraphy_painting=1.0, cultural_relic=0.0))


def test_finish_run_writes_sheet_report_and_chart(dev_tsv, tmp_path, capsys):
    data = load_mmbench(dev_tsv)
    run_dir = make_run_dir(tmp_path / "work")
    finish_run(data, answers_with_mistakes(data), "vlmevalkit", run_dir)
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["MMBench_DEV_EN_acc.csv", "MMBench_DEV_EN_acc.json", "MMBench_DEV_EN_acc.png",
                     "MMBench_DEV_EN_result.xlsx"]
    csv = pd.read_csv(run_dir / "MMBench_DEV_EN_acc.csv")
    assert list(csv["eval"]) == ["circular", "single"] and csv["Overall"].round(4).tolist() == [0.3333, 0.6667]
    summary = json.loads((run_dir / "MMBench_DEV_EN_acc.json").read_text())
    assert summary["questions"] == 3 and summary["rows"] == 12 and summary["unextracted_rows"] == 2
    assert summary["accuracy"][1]["FP-S"] == 1.0 and summary["matcher"] == "vlmevalkit"
    with Image.open(run_dir / "MMBench_DEV_EN_acc.png") as chart:
        assert chart.format == "PNG" and chart.size[0] >= 600
    sheet = pd.read_excel(run_dir / "MMBench_DEV_EN_result.xlsx")
    assert list(sheet.columns) == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                   "l2-category", "split", "source", "comment", "prediction", "extracted", "hit"]
    assert len(sheet) == 12 and sheet["hit"].sum() == 10
    assert sheet.loc[sheet["index"] == 2, "extracted"].isna().all()
    printed = capsys.readouterr().out
    assert "Overall" in printed and "33.3" in printed and "66.7" in printed and "FP-S" in printed


def test_a_prediction_with_control_characters_does_not_stop_the_run(dev_tsv, tmp_path):
    """A model may emit control characters, which openpyxl refuses in a sheet (pandas 3 keeps text in its own
    string dtype, not object): they are dropped from the sheet only, and the score is that of the raw text."""
    data = load_mmbench(dev_tsv)
    predictions = {i: "A\x0b\x1b" for i in answers_with_mistakes(data)}
    run_dir = make_run_dir(tmp_path / "work")
    finish_run(data, predictions, "vlmevalkit", run_dir)
    sheet = pd.read_excel(run_dir / "MMBench_DEV_EN_result.xlsx")
    assert set(sheet["prediction"]) == {"A"} and len(sheet) == len(predictions)


def test_test_split_gets_only_the_submission_sheet(tmp_path, images):
    rows = [dict(r, answer=None) for q in base_questions(images) for r in rotations(q, 2, image_refs=True)]
    data = load_mmbench(write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows,
                                  columns=["index", "question", "hint", "A", "B", "C", "D", "category",
                                           "l2-category", "split", "image"]))
    run_dir = make_run_dir(tmp_path / "work")
    assert finish_run(data, {q.index: "A" for q in data.questions}, "vlmevalkit", run_dir) is None
    assert [p.name for p in run_dir.iterdir()] == ["MMBench_TEST_EN_result.xlsx"]
    sheet = pd.read_excel(run_dir / "MMBench_TEST_EN_result.xlsx")
    assert list(sheet.columns) == ["index", "question", "hint", "A", "B", "C", "D", "category", "l2-category",
                                   "split", "prediction"]
    assert len(sheet) == 6


def test_rescore_from_our_sheet_matches_the_original_run(dev_tsv, tmp_path):
    data = load_mmbench(dev_tsv)
    first = make_run_dir(tmp_path / "work")
    finish_run(data, answers_with_mistakes(data), "vlmevalkit", first)
    second = rescore(first / "MMBench_DEV_EN_result.xlsx", dev_tsv, "vlmevalkit", tmp_path / "work")
    assert second != first and second.parent == first.parent
    assert json.loads((second / "args.json").read_text())["matcher"] == "vlmevalkit"
    pd.testing.assert_frame_equal(pd.read_csv(first / "MMBench_DEV_EN_acc.csv"),
                                  pd.read_csv(second / "MMBench_DEV_EN_acc.csv"))


def test_rescore_reads_an_xtuner_result_sheet(dev_tsv, tmp_path):
    data = load_mmbench(dev_tsv)
    # XTuner's mmbench_result.xlsx: question, options, prediction, category, l2-category, index, split, answer
    sheet = pd.DataFrame([dict(question=q.question, **q.options, prediction=f"({q.answer}) {q.options[q.answer]}",
                               category=q.category, index=q.index, answer=q.answer) for q in data.questions])
    sheet.to_excel(tmp_path / "mmbench_result.xlsx", index=False)
    run_dir = rescore(tmp_path / "mmbench_result.xlsx", dev_tsv, "xtuner", tmp_path / "work")
    assert pd.read_csv(run_dir / "MMBench_DEV_EN_acc.csv")["Overall"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_rescore_reads_csv_and_tsv_predictions_with_text_kept_as_written(dev_tsv, tmp_path, suffix, sep):
    """VLMEvalKit's `load` reads .csv/.tsv result tables too; a prediction "None" or "NA" is what the model said."""
    data = load_mmbench(dev_tsv)
    said = {q.index: f"{q.answer}." for q in data.questions}
    said[0], said[1] = "None", "NA"
    pd.DataFrame({"index": [float(i) for i in said], "prediction": list(said.values())}).to_csv(
        tmp_path / f"preds{suffix}", sep=sep, index=False)
    assert read_predictions(tmp_path / f"preds{suffix}") == said
    run_dir = rescore(tmp_path / f"preds{suffix}", dev_tsv, "vlmevalkit", tmp_path / "work")
    assert pd.read_csv(run_dir / "MMBench_DEV_EN_acc.csv")["Overall"].tolist() == [1 / 3, 1 / 3]  # questions 0 and 1 were not answered
    (tmp_path / "preds.txt").write_text("index,prediction\n0,A\n")
    with pytest.raises(UserError, match=r"preds.txt: predictions must be one of .xlsx, .csv, .tsv, .jsonl files"):
        read_predictions(tmp_path / "preds.txt")


def test_a_null_prediction_in_a_log_is_no_answer(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"index": 0, "prediction": null}\n{"index": 1, "prediction": "B"}\n')
    assert read_predictions(path) == {0: "", 1: "B"}


def test_predictions_must_belong_to_the_data_file(dev_tsv, tmp_path):
    data = load_mmbench(dev_tsv)
    with pytest.raises(UserError, match=r"1 predicted indices are not in .*MMBench_DEV_EN.tsv \(first: 99\)"):
        finish_run(data, {0: "A", 99: "B"}, "vlmevalkit", tmp_path)
    pd.DataFrame({"index": [0], "answer": ["A"]}).to_excel(tmp_path / "bad.xlsx", index=False)
    with pytest.raises(UserError, match="bad.xlsx: needs 'index' and 'prediction' columns"):
        rescore(tmp_path / "bad.xlsx", dev_tsv, "vlmevalkit", tmp_path / "work")
    with pytest.raises(UserError, match="unknown matcher"):
        rescore(tmp_path / "bad.xlsx", dev_tsv, "chatgpt", tmp_path / "work")
    pd.DataFrame({"index": [0, 99], "prediction": ["A", "B"]}).to_excel(tmp_path / "other.xlsx", index=False)
    with pytest.raises(UserError, match=r"1 predicted indices are not in .*\(first: 99\)"):
        rescore(tmp_path / "other.xlsx", dev_tsv, "vlmevalkit", tmp_path / "work")
    assert not (tmp_path / "work").exists()  # nothing created for a bad matcher, sheet or row set


def test_prediction_store_resumes_and_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with PredictionStore(path) as store:
        store.add(0, "A")
        store.add(1000000, "The answer is B.\nBecause…")
    with path.open("a", encoding="utf-8") as f:
        f.write('{"index": 2, "predic')  # a crash in the middle of a write
    with PredictionStore(path) as store:
        assert store.done == {0: "A", 1000000: "The answer is B.\nBecause…"}
        store.add(2, "C")
    assert read_predictions(path) == {0: "A", 1000000: "The answer is B.\nBecause…", 2: "C"}
    assert path.read_text(encoding="utf-8").count("\n") == 3


def test_prediction_store_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"index": 0, "prediction": "A"}\nnot json\n{"index": 1, "prediction": "B"}\n')
    with pytest.raises(UserError, match="predictions.jsonl: line 2 is not an"):
        PredictionStore(path)


def test_run_dirs_never_collide(tmp_path):
    first, second = make_run_dir(tmp_path), make_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
