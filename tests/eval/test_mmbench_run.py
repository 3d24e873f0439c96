"""`vlmtune mmbench` end to end on the tiny models: TSV -> generation -> predictions sheet -> scores.

Real models (random tiny weights), real base64 JPEGs, real files; the killed run is a real process killed with
SIGKILL. Predictions of a random model are gibberish, which is fine: the tests compare runs with each other
and with the Generator's own one-at-a-time `answer`, and check that scoring sees exactly what was generated.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mmbench_tsv import base_questions, rotations, write_tsv

from vlmtune.cli import main as cli_main
from vlmtune.config import ModelConfig
from vlmtune.data.image import ImagePreprocessor
from vlmtune.data.templates import get_template
from vlmtune.eval.mmbench import DEFAULT_MAX_NEW_TOKENS, gather_predictions, run_mmbench
from vlmtune.eval.mmbench_data import decode_image, load_mmbench
from vlmtune.eval.prompt import build_prompt
from vlmtune.eval.results import read_predictions
from vlmtune.eval.scoring import score
from vlmtune.inference import Generator
from vlmtune.model.build import build_model, load_image_processor, load_tokenizer

MAX_NEW = 8  # enough tokens for the tiny model's answers to differ between questions


@pytest.fixture(scope="module")
def generator(tiny) -> Generator:
    """A Generator over the tiny LLM + CLIP + a fresh projector, as MMBench runs it (vicuna, pad to square)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(str(tiny.llm), str(tiny.clip), torch_dtype="float32"), for_training=False)
    preprocess = ImagePreprocessor(load_image_processor(str(tiny.clip)), pad_to_square=True)
    return Generator(model.eval(), load_tokenizer(str(tiny.llm)), get_template("vicuna"), preprocess, image_length=576)


@pytest.fixture
def mixed_tsv(tmp_path, images):
    """Dev TSV of 12 rows whose prompts have different lengths (one question has a hint): batches get padding."""
    rows = [r for q in base_questions(images) for r in rotations(q, 4, image_refs=True)]
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)


def one_at_a_time(generator: Generator, tsv: Path) -> dict[int, str]:
    """Reference predictions: the Generator's single-prompt `answer`, row by row, in file order."""
    return {
        q.index: generator.answer(build_prompt(q), decode_image(q), max_new_tokens=MAX_NEW)
        for q in load_mmbench(tsv).questions
    }


def test_default_max_new_tokens_is_vlmevalkit_mcq():
    """VLMEvalKit's LLaVA_XTuner generates at most 5 tokens for multiple-choice data."""
    assert DEFAULT_MAX_NEW_TOKENS == 5


def test_dev_run_writes_sheet_and_scores_of_what_was_generated(generator, mixed_tsv, tmp_path, capsys):
    data = load_mmbench(mixed_tsv)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = run_mmbench(generator, data, run_dir, batch_size=5, max_new_tokens=MAX_NEW)

    logged = gather_predictions(run_dir)
    assert sorted(logged) == sorted(q.index for q in data.questions)
    sheet = pd.read_excel(run_dir / "MMBench_DEV_EN_result.xlsx")
    assert list(sheet["index"]) == [q.index for q in data.questions]  # file order, whatever the batch order
    assert [str(p) if not pd.isna(p) else "" for p in sheet["prediction"]] == [logged[i] for i in sheet["index"]]
    assert {"extracted", "hit", "answer", "category"} <= set(sheet.columns) and "image" not in sheet.columns
    expected = score(data, logged, "vlmevalkit")
    pd.testing.assert_frame_equal(report.table, expected.table)
    for ext in ("csv", "json", "png"):
        assert (run_dir / f"MMBench_DEV_EN_acc.{ext}").stat().st_size > 0
    assert "circular/dev" in capsys.readouterr().out
    assert len(set(logged.values())) > 1  # the tiny model does answer differently per question


def test_batched_equals_one_at_a_time(generator, mixed_tsv, tmp_path):
    data = load_mmbench(mixed_tsv)
    reference = one_at_a_time(generator, mixed_tsv)
    for batch_size in (1, 5, 12):
        run_dir = tmp_path / f"bs{batch_size}"
        run_dir.mkdir()
        run_mmbench(generator, data, run_dir, batch_size=batch_size, max_new_tokens=MAX_NEW)
        assert gather_predictions(run_dir) == reference, f"batch size {batch_size}"


def test_rerun_in_same_folder_generates_only_missing_rows(generator, mixed_tsv, tmp_path, capsys):
    """A log holding some rows (and a line cut mid-write) is continued; finished rows are not regenerated."""
    data = load_mmbench(mixed_tsv)
    reference = one_at_a_time(generator, mixed_tsv)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kept = [q.index for q in data.questions[:5]]
    lines = [json.dumps({"index": i, "prediction": "kept " + reference[i]}) for i in kept]
    (run_dir / "predictions.jsonl").write_text("\n".join(lines) + '\n{"index": 7, "predic')
    run_mmbench(generator, data, run_dir, batch_size=4, max_new_tokens=MAX_NEW)

    done = gather_predictions(run_dir)
    assert {i: done[i] for i in kept} == {i: "kept " + reference[i] for i in kept}  # untouched
    assert {i: p for i, p in done.items() if i not in kept} == {i: p for i, p in reference.items() if i not in kept}
    log = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(log) == len(data.questions)  # the cut line was dropped, no row written twice
    assert "resuming" in capsys.readouterr().out


def test_test_split_writes_submission_sheet(generator, tmp_path, images, capsys):
    rows = [dict(r, answer=None) for q in base_questions(images)[:2] for r in rotations(q, 2, image_refs=True)]
    tsv = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows,
                    columns=["index", "question", "hint", "A", "B", "C", "D", "category", "l2-category",
                             "split", "image"])
    data = load_mmbench(tsv)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run_mmbench(generator, data, run_dir, batch_size=3, max_new_tokens=MAX_NEW) is None

    sheet = pd.read_excel(run_dir / "MMBench_TEST_EN_result.xlsx")
    assert list(sheet.columns) == ["index", "question", "hint", "A", "B", "C", "D", "category", "l2-category",
                                   "split", "prediction"]
    assert read_predictions(run_dir / "MMBench_TEST_EN_result.xlsx") == gather_predictions(run_dir)
    assert not list(run_dir.glob("*_acc.*"))
    assert "submit" in capsys.readouterr().out
