"""`vlmtune mmbench` end to end on the tiny models: TSV -> generation -> predictions sheet -> scores.

Real models (random tiny weights), real base64 JPEGs, real files; the killed run is a real process killed with
SIGKILL. Predictions of a random model are gibberish, which is fine: the tests compare runs with each other
and with the Generator's own one-at-a-time `answer`, and check that scoring sees exactly what was generated.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mmbench_tsv import base_questions, rotations, write_tsv

from vlmtune.cli import build_parser
from vlmtune.cli import main as cli_main
from vlmtune.eval.mmbench import DEFAULT_MAX_NEW_TOKENS, RESULT_GLOB, generation_args, mmbench_items, run_mmbench
from vlmtune.eval.mmbench_data import decode_image, load_mmbench
from vlmtune.eval.prompt import build_prompt
from vlmtune.eval.results import read_predictions
from vlmtune.eval.runner import batches, find_resumable, gather_predictions, image_groups, shard, write_args
from vlmtune.eval.scoring import score
from vlmtune.inference import Generator
from vlmtune.loading import load_generator

MAX_NEW = 8  # enough tokens for the tiny model's answers to differ between questions


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def generator(model_args) -> Generator:
    """The Generator `vlmtune mmbench` builds from those flags (vlmtune.loading), images padded to square."""
    args = build_parser().parse_args(["mmbench", *model_args, "--data-path", "unused.tsv"])
    generator = load_generator(args)
    assert generator.preprocess.pad_to_square
    return generator


@pytest.fixture(scope="module")
def mixed_tsv(tmp_path_factory, images):
    """Dev TSV of 12 rows whose prompts have different lengths (one question has a hint): batches get padding."""
    rows = [r for q in base_questions(images) for r in rotations(q, 4, image_refs=True)]
    return write_tsv(tmp_path_factory.mktemp("mixed") / "MMBench_DEV_EN.tsv", rows)


@pytest.fixture(scope="module")
def one_at_a_time(generator, mixed_tsv) -> dict[int, str]:
    """Reference predictions: the Generator's single-prompt `answer`, row by row, in file order."""
    return {
        q.index: generator.answer(build_prompt(q), decode_image(q), max_new_tokens=MAX_NEW)
        for q in load_mmbench(mixed_tsv).questions
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


def test_batched_equals_one_at_a_time(generator, mixed_tsv, one_at_a_time, tmp_path):
    data = load_mmbench(mixed_tsv)
    reference = one_at_a_time
    for batch_size in (3, 5, 12):  # 3: each question split over two batches; 5: one question per batch; 12: all in one
        run_dir = tmp_path / f"bs{batch_size}"
        run_dir.mkdir()
        run_mmbench(generator, data, run_dir, batch_size=batch_size, max_new_tokens=MAX_NEW)
        assert gather_predictions(run_dir) == reference, f"batch size {batch_size}"


def test_rotations_are_grouped_longest_first_and_batched_whole(generator, mixed_tsv):
    questions = load_mmbench(mixed_tsv).questions
    prompts = {q.index: generator.prompt_ids([(build_prompt(q), None)]) for q in questions}
    groups = image_groups(mmbench_items(generator, questions, MAX_NEW))
    assert [len({q.id % 1_000_000 for q in g}) for g in groups] == [1, 1, 1]  # a question's 4 rotations
    assert sorted(q.id for g in groups for q in g) == sorted(q.index for q in questions)
    longest = [max(len(prompts[q.id]) for q in g) for g in groups]
    assert longest == sorted(longest, reverse=True) and longest[0] == max(len(p) for p in prompts.values())

    def sizes(batch_size: int) -> list[list[int]]:
        return [[len(g) for g in b] for b in batches([[0] * 4, [0] * 3, [0] * 4, [0] * 2], batch_size)]

    assert sizes(8) == [[4, 3], [4, 2]]  # whole groups, never more than 8 rows
    assert sizes(3) == [[3], [1], [3], [3], [1, 2]]  # split only where a group alone is larger
    assert sizes(1) == [[1]] * 13


def test_shared_prefix_batches_equal_batch_size_one_with_one_encoding_per_image(generator, mixed_tsv, tmp_path):
    """Batch size 8 holds two questions' 4 rotations: each image goes through CLIP once (Generator.generate_shared),
    not once per row, and the predictions are those of batch size 1, the plain one-row path."""
    data = load_mmbench(mixed_tsv)
    encoded: list[int] = []  # images per pass through CLIP
    hook = generator.model.visual_encoder.register_forward_pre_hook(lambda m, args: encoded.append(len(args[0])))
    runs = {}
    try:
        for batch_size in (1, 8):
            encoded.clear()
            run_dir = tmp_path / f"bs{batch_size}"
            run_dir.mkdir()
            run_mmbench(generator, data, run_dir, batch_size=batch_size, max_new_tokens=MAX_NEW)
            runs[batch_size] = gather_predictions(run_dir), list(encoded)
    finally:
        hook.remove()
    assert runs[8][0] == runs[1][0] and len(runs[1][0]) == 12
    assert runs[1][1] == [1] * 12 and runs[8][1] == [2, 1]  # 3 questions, 4 rotations each


def test_rerun_in_same_folder_generates_only_missing_rows(generator, mixed_tsv, one_at_a_time, tmp_path, capsys):
    """A log holding some rows (and a line cut mid-write) is continued; finished rows are not regenerated."""
    data = load_mmbench(mixed_tsv)
    reference = one_at_a_time
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


# ---- through the command line ------------------------------------------------------------------------------


@pytest.fixture
def long_tsv(tmp_path, images):
    """Dev TSV of 24 rows (6 questions x 4 rotations): long enough to kill a run in the middle."""
    questions = [dict(q, index=q["index"] + 10 * copy) for copy in range(2) for q in base_questions(images)]
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", [r for q in questions for r in rotations(q, 4, image_refs=True)])


def run_dirs(work_dir: Path) -> list[Path]:
    """The run folders `vlmtune mmbench` made in work_dir."""
    return sorted(p.parent for p in work_dir.glob("*/args.json"))


def log_lines(run_dir: Path) -> list[str]:
    """Complete lines of every prediction log in run_dir."""
    return [line for log in run_dir.glob("predictions*.jsonl") for line in log.read_text().splitlines(keepends=True)
            if line.endswith("\n")]


def command(model_args, tsv, work_dir, *more) -> list[str]:
    return ["mmbench", *model_args, "--data-path", str(tsv), "--work-dir", str(work_dir), *more]


@pytest.mark.e2e
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(model_args, long_tsv, tmp_path, capsys):
    rows = len(load_mmbench(long_tsv).questions)
    assert cli_main(command(model_args, long_tsv, tmp_path / "whole", "--batch-size", "8")) == 0
    (whole,) = run_dirs(tmp_path / "whole")
    expected = gather_predictions(whole)
    assert len(expected) == rows and (whole / "MMBench_DEV_EN_result.xlsx").is_file()

    work_dir = tmp_path / "killed"
    argv = [sys.executable, "-m", "vlmtune", *command(model_args, long_tsv, work_dir, "--batch-size", "1")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = run_dirs(work_dir)
        if dirs and len(log_lines(dirs[0])) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = run_dirs(work_dir)
    before = len(log_lines(run_dir))
    assert 3 <= before < rows, "the run was not killed in the middle"
    assert not (run_dir / "MMBench_DEV_EN_result.xlsx").exists()

    capsys.readouterr()
    assert cli_main(command(model_args, long_tsv, work_dir, "--batch-size", "4")) == 0  # batch size may change
    assert run_dirs(work_dir) == [run_dir]  # continued in the same folder
    assert f"resuming {run_dir}: {before} of {rows} rows" in capsys.readouterr().out
    assert len(log_lines(run_dir)) == rows  # each row generated once: only the rest was done
    assert gather_predictions(run_dir) == expected
    assert read_predictions(run_dir / "MMBench_DEV_EN_result.xlsx") == expected


def test_only_unfinished_runs_with_the_same_generation_arguments_resume(model_args, mixed_tsv, tmp_path):
    def wanted(*more):
        return generation_args(build_parser().parse_args(command(model_args, mixed_tsv, tmp_path, *more)))

    run_dir = tmp_path / "20250101_000000"
    run_dir.mkdir()
    write_args(run_dir, {"generation": wanted()})
    assert find_resumable(tmp_path, wanted("--batch-size", "3", "--matcher", "xtuner", "--device", "cuda"),
                          RESULT_GLOB) == run_dir
    assert find_resumable(tmp_path, wanted("--max-new-tokens", "3"), RESULT_GLOB) is None
    assert find_resumable(tmp_path, wanted("--no-pad-image-to-square"), RESULT_GLOB) is None
    (run_dir / "MMBench_DEV_EN_result.xlsx").touch()  # finished: a rerun starts a new evaluation
    assert find_resumable(tmp_path, wanted(), RESULT_GLOB) is None


@pytest.mark.e2e
def test_shard_keeps_rotations_on_one_rank_and_covers_every_row_once(generator, mixed_tsv):
    questions = load_mmbench(mixed_tsv).questions
    parts = [shard(mmbench_items(generator, questions, MAX_NEW), rank, 3) for rank in range(3)]
    indices = [q.id for part in parts for q in part]
    assert sorted(indices) == sorted(q.index for q in questions) and len(set(indices)) == len(indices)
    assert all(parts)  # every rank gets work
    for part in parts:  # a question's rotations (index % 1e6) all land on the rank that has any of them
        base = {q.id % 1_000_000 for q in part}
        assert {q.index for q in questions if q.index % 1_000_000 in base} == {q.id for q in part}


def test_two_processes_split_the_rows_and_rank0_gathers(generator, model_args, mixed_tsv, tmp_path):
    single = tmp_path / "single"
    assert cli_main(command(model_args, mixed_tsv, single, "--batch-size", "4")) == 0
    with socket.socket() as s:  # a free port: torchrun's default 29500 may be taken by another job
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PORT": port}
    done = subprocess.run([sys.executable, "-m", "vlmtune", *command(model_args, mixed_tsv, tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "two")
    logs = sorted(p.name for p in run_dir.glob("predictions*.jsonl"))
    assert logs == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    rank1 = read_predictions(run_dir / "predictions.rank1.jsonl")
    questions = load_mmbench(mixed_tsv).questions
    assert sorted(rank1) == sorted(q.id for q in shard(mmbench_items(generator, questions, MAX_NEW), 1, 2))
    assert sorted(rank1 | read_predictions(run_dir / "predictions.rank0.jsonl")) == sorted(q.index for q in questions)
    assert gather_predictions(run_dir) == gather_predictions(run_dirs(single)[0])
    assert read_predictions(run_dir / "MMBench_DEV_EN_result.xlsx") == gather_predictions(run_dir)


def test_predictions_flag_rescores_without_a_model(model_args, mixed_tsv, tmp_path):
    assert cli_main(command(model_args, mixed_tsv, tmp_path / "run", "--batch-size", "12")) == 0
    (run_dir,) = run_dirs(tmp_path / "run")
    sheet = run_dir / "MMBench_DEV_EN_result.xlsx"
    assert cli_main(["mmbench", "--predictions", str(sheet), "--data-path", str(mixed_tsv),
                     "--work-dir", str(tmp_path / "rescored"), "--matcher", "xtuner"]) == 0
    (rescored,) = run_dirs(tmp_path / "rescored")
    summary = json.loads((rescored / "MMBench_DEV_EN_acc.json").read_text())
    expected = score(load_mmbench(mixed_tsv), gather_predictions(run_dir), "xtuner").table
    assert summary["matcher"] == "xtuner" and summary["predicted_rows"] == 12
    assert [row["Overall"] for row in summary["accuracy"]] == list(expected["Overall"])


def test_bad_data_file_is_one_line_error_before_loading_the_model(tmp_path, capsys):
    code = cli_main(["mmbench", "no/such/llm", "--data-path", str(tmp_path / "missing.tsv"),
                     "--work-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmtune: error:") and "missing.tsv" in err and "\n" not in err
    assert not list(tmp_path.iterdir())  # no run folder for a run that never started
