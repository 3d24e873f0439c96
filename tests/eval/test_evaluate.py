"""`vlmtune eval` end to end on the tiny models: TSVs of each kind -> generation -> sheets, VLMEvalKit tables, summary.

Real models (random tiny weights), real base64 JPEGs, real files; the killed run is a real process killed with
SIGKILL, the two-process run a real torchrun. A random model's answers are gibberish, which is fine: the tests
compare runs with each other, with the Generator's one-row `answer`, and check that the scores are those of
exactly what was generated.
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
from bench_tsv import (MCQ_COLUMNS, MMMU_COLUMNS, VQA_COLUMNS, YORN_COLUMNS, mcq_rows, mmmu_rows, vqa_rows,
                       yorn_rows)
from mmbench_tsv import base_questions, rotations, write_tsv

import vlmtune.eval.evaluate as evaluate
from vlmtune.cli import build_parser
from vlmtune.cli import main as cli_main
from vlmtune.eval.bench_data import Benchmark
from vlmtune.eval.benchmarks import kind_for
from vlmtune.eval.runner import gather_predictions
from vlmtune.loading import load_generator

MAX_NEW = 8  # enough tokens for the tiny model's answers to differ between rows


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory, images) -> dict[str, Path]:
    """One generated TSV per kind (MCQ, yes/no, VQA), MMMU (two images in a row, an open question), MMBench."""
    d = tmp_path_factory.mktemp("bench")
    return {
        "mcq": write_tsv(d / "ScienceQA_VAL.tsv", mcq_rows(images), MCQ_COLUMNS),
        "yorn": write_tsv(d / "MME.tsv", yorn_rows(images), YORN_COLUMNS),
        "vqa": write_tsv(d / "TextVQA_VAL.tsv", vqa_rows(images), VQA_COLUMNS),
        "mmmu": write_tsv(d / "MMMU_DEV_VAL.tsv", mmmu_rows(images), MMMU_COLUMNS),
        "mmbench": write_tsv(d / "MMBench_DEV_EN.tsv",
                             [r for q in base_questions(images) for r in rotations(q, 4, image_refs=True)]),
    }


def command(model_args, paths, work_dir, *more) -> list[str]:
    return ["eval", *model_args, "--data-path", *map(str, paths), "--work-dir", str(work_dir), *more]


def run_dirs(work_dir: Path) -> list[Path]:
    return sorted(p.parent for p in work_dir.glob("*/args.json"))


def predictions_of(run_dir: Path) -> dict[str, dict]:
    """Benchmark folder name -> its gathered predictions."""
    return {d.name: gather_predictions(d) for d in sorted(run_dir.iterdir()) if d.is_dir()}


@pytest.fixture(scope="module")
def whole_run(model_args, files, tmp_path_factory) -> Path:
    """One uninterrupted `vlmtune eval` over the three kinds, batch size 4: the reference of the other runs."""
    work_dir = tmp_path_factory.mktemp("whole")
    paths = [files["mcq"], files["yorn"], files["vqa"]]
    assert cli_main(command(model_args, paths, work_dir, "--batch-size", "4")) == 0
    (run_dir,) = run_dirs(work_dir)
    return run_dir


def test_five_benchmarks_in_one_command_load_the_model_once(model_args, files, tmp_path, monkeypatch, capsys):
    loads = []
    real = evaluate.load_for_eval
    monkeypatch.setattr(evaluate, "load_for_eval", lambda args: loads.append(1) or real(args))  # counts, then loads
    assert cli_main(command(model_args, files.values(), tmp_path, "--batch-size", "5")) == 0
    assert len(loads) == 1
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())["results"]
    assert [(r["benchmark"], r["metric"]) for r in summary] == [
        ("ScienceQA_VAL", "Overall"), ("MME", "perception"), ("MME", "reasoning"), ("TextVQA_VAL", "Overall"),
        ("MMMU_DEV_VAL", "Overall"), ("MMBench_DEV_EN", "Overall (circular)")]
    assert (run_dir / "summary.csv").stat().st_size > 0 and (run_dir / "summary.png").stat().st_size > 0
    for stem, table in [("ScienceQA_VAL", "_acc"), ("MME", "_score"), ("TextVQA_VAL", "_acc"), ("MMMU_DEV_VAL", "_acc"),
                        ("MMBench_DEV_EN", "_acc")]:
        assert (run_dir / stem / f"{stem}_result.xlsx").is_file() and (run_dir / stem / f"{stem}{table}.csv").is_file()
    mmmu = pd.read_excel(run_dir / "MMMU_DEV_VAL" / "MMMU_DEV_VAL_result.xlsx")
    assert list(mmmu["index"]) == [0, 1, 2] and "image" not in mmmu.columns  # the two-image row was answered


def test_predictions_are_one_row_at_a_time_answers_and_the_scores_are_theirs(model_args, files, whole_run):
    """Batched with shared images (MME: two questions per image) = the Generator's own one-row `answer`; the
    written tables are the scorer's on exactly the logged predictions."""
    args = build_parser().parse_args(["eval", *model_args, "--data-path", "x.tsv"])
    generator = load_generator(args)
    for key in ("yorn", "vqa"):
        kind = kind_for(files[key])
        bench = kind.load(files[key], kind.name)
        logged = gather_predictions(whole_run / files[key].stem)
        expected = {r.index: generator.answer(kind.prompt(r), r.decode_images()[0], max_new_tokens=MAX_NEW)
                    for r in bench.rows}
        assert logged == expected, key
        written = pd.read_csv(whole_run / files[key].stem / f"{files[key].stem}{kind.table_suffix}.csv")
        pd.testing.assert_frame_equal(written, kind.score(bench, logged).table, check_dtype=False)
    assert len(set(logged.values())) > 1  # the tiny model does answer differently per row


def test_prompts_file_records_each_rows_prompt_budget_and_postprocessing(whole_run):
    records = [json.loads(line) for line in (whole_run / "TextVQA_VAL" / "prompts.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records[0]["max_new_tokens"] == MAX_NEW  # --max-new-tokens given
    assert records[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    assert "VQA normalisation" in records[0]["postprocess"]


def test_rescoring_from_predictions_gives_the_same_tables(files, whole_run, tmp_path):
    stems = ["ScienceQA_VAL", "MME", "TextVQA_VAL"]
    sheets = [whole_run / s / f"{s}_result.xlsx" for s in stems]
    data = [files["mcq"], files["yorn"], files["vqa"]]
    assert cli_main(["eval", "--predictions", *map(str, sheets), "--data-path", *map(str, data),
                     "--work-dir", str(tmp_path)]) == 0
    (rescored,) = run_dirs(tmp_path)
    for stem, suffix in zip(stems, ["_acc", "_score", "_acc"]):
        pd.testing.assert_frame_equal(pd.read_csv(rescored / stem / f"{stem}{suffix}.csv"),
                                      pd.read_csv(whole_run / stem / f"{stem}{suffix}.csv"))
    assert json.loads((rescored / "summary.json").read_text())["results"] == json.loads(
        (whole_run / "summary.json").read_text())["results"]


def test_a_predictions_file_of_another_benchmark_is_refused(files, whole_run, tmp_path, capsys):
    sheet = whole_run / "MME" / "MME_result.xlsx"
    code = cli_main(["eval", "--predictions", str(sheet), "--data-path", str(files["vqa"]), "--work-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "MME_result.xlsx: row 2:" in err and "TextVQA_VAL.tsv" in err
    assert not list(tmp_path.iterdir())


def test_two_processes_give_the_same_predictions_and_numbers(model_args, files, whole_run, tmp_path):
    with socket.socket() as s:  # a free port: torchrun's default may be taken by another job
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PORT": port}
    paths = [files["mcq"], files["yorn"], files["vqa"]]
    done = subprocess.run([sys.executable, "-m", "vlmtune", *command(model_args, paths, tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert sorted(p.name for p in (run_dir / "MME").glob("predictions*.jsonl")) == [
        "predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    assert predictions_of(run_dir) == predictions_of(whole_run)
    assert json.loads((run_dir / "summary.json").read_text())["results"] == json.loads(
        (whole_run / "summary.json").read_text())["results"]


def log_lines(bench_dir: Path) -> int:
    return sum(line.endswith("\n") for log in bench_dir.glob("predictions*.jsonl")
               for line in log.read_text().splitlines(keepends=True))


@pytest.mark.e2e
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(model_args, files, whole_run, tmp_path, capsys):
    paths = [files["mcq"], files["yorn"], files["vqa"]]
    argv = [sys.executable, "-m", "vlmtune", *command(model_args, paths, tmp_path, "--batch-size", "1")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # kill it in the middle of the second benchmark
        dirs = run_dirs(tmp_path)
        if dirs and (dirs[0] / "MME").is_dir() and log_lines(dirs[0] / "MME") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = run_dirs(tmp_path)
    before = log_lines(run_dir / "MME")
    assert 3 <= before < 8, "the run was not killed in the middle of MME"
    assert not (run_dir / "summary.json").exists() and log_lines(run_dir / "ScienceQA_VAL") == 8

    capsys.readouterr()
    assert cli_main(command(model_args, paths, tmp_path, "--batch-size", "4")) == 0  # batch size may change
    assert run_dirs(tmp_path) == [run_dir]  # continued in the same folder
    assert f"resuming {run_dir / 'MME'}: {before} of 8 rows" in capsys.readouterr().out
    assert [log_lines(run_dir / s) for s in ("ScienceQA_VAL", "MME", "TextVQA_VAL")] == [8, 8, 8]  # each row once
    assert predictions_of(run_dir) == predictions_of(whole_run)
    assert json.loads((run_dir / "summary.json").read_text())["results"] == json.loads(
        (whole_run / "summary.json").read_text())["results"]


@pytest.mark.parametrize(("breakage", "message"), [
    ("drop_answer", "MME.tsv: missing column(s) answer"),
    ("bad_image", "MME.tsv: row 2 (index 1): image is not a decodable base64 image"),
    ("bad_literal", "TextVQA_VAL.tsv: row 1 (index 0): cell"),
])
def test_bad_data_is_one_line_before_the_model_loads(files, tmp_path, capsys, breakage, message):
    name = "TextVQA_VAL.tsv" if breakage == "bad_literal" else "MME.tsv"
    df = pd.read_csv(files["vqa" if breakage == "bad_literal" else "yorn"], sep="\t", dtype=str, keep_default_na=False)
    if breakage == "drop_answer":
        df = df.drop(columns="answer")
    elif breakage == "bad_image":
        df.loc[1, "image"] = "not an image " * 10
    else:
        df.loc[0, "answer"] = "[open('x')]"
    bad = tmp_path / "data" / name
    bad.parent.mkdir()
    df.to_csv(bad, sep="\t", index=False)
    code = cli_main(["eval", "no/such/llm", "--data-path", str(bad), "--work-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()  # nothing started: the model path was never even looked at


def test_max_new_tokens_defaults_per_kind(files, tmp_path):
    """VLMEvalKit's LLaVA_XTuner budget (llava_xtuner.py:141-156): 5 for MCQ and yes/no, 512 for the rest."""
    loaded = evaluate.load_all([str(files["mcq"]), str(files["yorn"]), str(files["vqa"])], None)
    assert [one.max_new_tokens(None) for one in loaded] == [5, 5, 512]
    assert [one.max_new_tokens(3) for one in loaded] == [3, 3, 3]
    assert all(isinstance(one.data, Benchmark) for one in loaded)
    evaluate.write_prompts(loaded[2], loaded[2].max_new_tokens(None), tmp_path / "p.jsonl")
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["max_new_tokens"] == 512
