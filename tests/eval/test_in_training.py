"""evaluation_benchmarks: benchmark subsets scored during `vlmtune train` (vlmtune/eval/in_training.py), end to end.

Real `python -m vlmtune train` runs of the tiny LoRA recipe with LoRA dropout on (so the global RNG decides the
weights: an evaluation drawing from it would change them), scoring the synthetic task's held-out MMBench TSV
(17 rows: on 2 ranks one rank has two batches of 8, the other one) and an MME TSV (6 rows, two per image) at
steps 2 and 4 of 4:

    one_rank        1 rank (ZeRO-2), with the benchmarks          scores logged, = `vlmtune eval` on iter_2
    one_rank_plain  the same without them                         the reference weights: RNG untouched
    zero3           2 ranks under ZeRO-3 (the model partitioned),  = `vlmtune eval` on iter_4; reference of the
                    with the benchmarks                            2-rank SIGKILL test (slow tier)
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from bench_tsv import YORN_COLUMNS, yorn_rows
from mmbench_tsv import write_tsv
from test_train import (WEIGHT_RTOL, assert_none_left, assert_ok, max_rel_diff, resumed_step, run_train, train_cmd,
                        train_env, two_ranks, wait_for, weights)

from vlmtune.cli import main as cli_main
from vlmtune.eval.runner import gather_predictions

pytestmark = pytest.mark.e2e
RECIPE = "tiny_llava_task_finetune_lora"
OPTIONS = {"max_steps": 4, "evaluation_freq": 2, "save_steps": 1, "save_total_limit": 0, "warmup_ratio": 0.25,
           "logging_interval": 1, "batch_size": 1, "group_by_length": False, "evaluation_inputs": [],
           "llm_lora.lora_dropout": 0.1, "visual_encoder_lora.lora_dropout": 0.1}
ROWS = {"heldout_mmbench": 17, "MME": 6}
ZERO3 = ("--deepspeed", "deepspeed_zero3")


@pytest.fixture(scope="module")
def bench(tiny, images, tmp_path_factory) -> dict[str, Path]:
    """The two benchmark files: the task's held-out MMBench TSV (48 rows) and an MME TSV (8 rows)."""
    mme = write_tsv(tmp_path_factory.mktemp("bench") / "MME.tsv", yorn_rows(images), YORN_COLUMNS)
    return {"heldout_mmbench": tiny.task / "heldout_mmbench.tsv", "MME": mme}


def with_benchmarks(bench: dict[str, Path]) -> dict:
    return dict(OPTIONS, evaluation_benchmarks=[{"data_path": str(bench[k]), "max_rows": n} for k, n in ROWS.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_runs")


@pytest.fixture(scope="module")
def one_rank(bench, runs) -> Path:
    assert_ok(run_train(RECIPE, runs / "one_rank", with_benchmarks(bench)))
    return runs / "one_rank"


@pytest.fixture(scope="module")
def one_rank_plain(runs) -> Path:
    assert_ok(run_train(RECIPE, runs / "one_rank_plain", OPTIONS))
    return runs / "one_rank_plain"


@pytest.fixture(scope="module")
def zero3(bench, runs) -> Path:
    assert_ok(run_train(RECIPE, runs / "zero3", with_benchmarks(bench), *ZERO3, **two_ranks()))
    return runs / "zero3"


def logged_scores(work_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> {"<benchmark> <metric>": value} from train_log.jsonl (the latest record of a step)."""
    lines = (work_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["scores"] for r in map(json.loads, lines) if "scores" in r}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def vlmtune_eval(tiny, bench: dict[str, Path], pth: Path, tmp_path: Path) -> Path:
    """`vlmtune eval` on the checkpoint, converted as users convert it, over copies of the benchmark files cut
    after the rows training scored; its run folder."""
    assert cli_main(["convert", "pth_to_hf", str(pth), str(tmp_path / "llava")]) == 0
    cut = []
    for name, n in ROWS.items():
        header, *rows = bench[name].read_text(encoding="utf-8").splitlines(keepends=True)
        (tmp_path / "cut").mkdir(exist_ok=True)
        cut.append(tmp_path / "cut" / bench[name].name)
        cut[-1].write_text(header + "".join(rows[:n]), encoding="utf-8")
    args = ["eval", str(tiny.llm), "--llava", str(tmp_path / "llava"), "--visual-encoder", str(tiny.clip),
            "--torch-dtype", "float32", "--device", "cpu", "--data-path", *map(str, cut), "--work-dir",
            str(tmp_path / "eval")]
    assert cli_main(args) == 0
    (run_dir,) = [p.parent for p in (tmp_path / "eval").glob("*/summary.json")]
    return run_dir


def assert_same_as_vlmtune_eval(work_dir: Path, step: int, run_dir: Path) -> None:
    """The step's predictions are `vlmtune eval`'s, row for row, and so are the logged headline numbers."""
    for name, n in ROWS.items():
        trained = gather_predictions(work_dir / "eval" / f"iter_{step}" / name)
        assert len(trained) == n and trained == gather_predictions(run_dir / name), name
    expected = {f"{r['benchmark']} {r['metric']}": r["value"] for r in json.loads((run_dir / "summary.json").read_text())["results"]}
    expected = {k: float("nan") if v is None else v for k, v in expected.items()}
    logged = logged_scores(work_dir)[step]
    assert logged.keys() == expected.keys() and all(same(logged[k], expected[k]) for k in expected), (logged, expected)
    assert {"heldout_mmbench Overall (circular)", "MME perception", "MME reasoning"} <= logged.keys()


def test_one_rank_logs_scores_at_the_evaluation_steps_equal_to_vlmtune_eval(tiny, bench, one_rank, tmp_path):
    assert sorted(logged_scores(one_rank)) == [2, 4]
    log = (one_rank / "train.log").read_text()
    assert "eval step 2 | heldout_mmbench Overall (circular) = " in log and "eval step 4 | MME perception = " in log
    with Image.open(one_rank / "loss_curve.png") as plot:  # 13 x 4 in at 100 dpi: the score panel beside the loss
        assert plot.size == (1300, 400)
    summary = json.loads((one_rank / "eval" / "iter_4" / "summary.json").read_text())["results"]
    assert {r["benchmark"] for r in summary} == set(ROWS)
    assert_same_as_vlmtune_eval(one_rank, 2, vlmtune_eval(tiny, bench, one_rank / "iter_2.pth", tmp_path))


def test_evaluation_leaves_the_trained_weights_alone(one_rank, one_rank_plain):
    """LoRA dropout draws from the global RNG every step: an evaluation that drew from it (or left a module
    in eval mode) would change the weights after step 2."""
    for step in (3, 4):
        assert max_rel_diff(weights(one_rank, step), weights(one_rank_plain, step)) == 0.0
    assert not (one_rank_plain / "eval").exists()
    with Image.open(one_rank_plain / "loss_curve.png") as plot:  # no scores: the loss alone, 7 x 4 in
        assert plot.size == (700, 400)


def test_two_ranks_under_zero3_score_sharded_as_vlmtune_eval_does(tiny, bench, zero3, tmp_path):
    """ZeRO-3 partitions every weight over the 2 ranks; each rank generates its share of the rows (the ranks
    in lockstep), and the numbers are those of one `vlmtune eval` process on the same checkpoint."""
    shards = sorted(p.name for p in (zero3 / "eval" / "iter_4" / "heldout_mmbench").glob("predictions*.jsonl"))
    assert shards == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    assert sorted(logged_scores(zero3)) == [2, 4]
    assert_same_as_vlmtune_eval(zero3, 4, vlmtune_eval(tiny, bench, zero3 / "iter_4.pth", tmp_path))


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: ZeRO-3, ~35 s
def test_killed_during_an_evaluation_resumes_to_the_same_weights_and_scores(ranks, bench, runs, request):
    """SIGKILL the whole run as the step-2 evaluation starts; --resume auto evaluates step 2 again from the
    start and ends on the uninterrupted run's weights and scores (one_rank, or zero3 for 2 ranks)."""
    reference = request.getfixturevalue("one_rank" if ranks == 1 else "zero3")
    extra, launch = ((), {}) if ranks == 1 else (ZERO3, two_ranks())
    work_dir = runs / f"killed_{ranks}"
    options = with_benchmarks(bench)
    proc = subprocess.Popen(train_cmd(RECIPE, work_dir, options, *extra), env=train_env(**launch),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(work_dir / "eval" / "iter_2", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_none_left(work_dir)
    assert not (work_dir / "iter_4.pth").exists()

    assert_ok(run_train(RECIPE, work_dir, options, *extra, "--resume", "auto", **launch))
    assert 1 <= resumed_step(work_dir) <= 2
    assert max_rel_diff(weights(work_dir, 4), weights(reference, 4)) <= WEIGHT_RTOL
    resumed, expected = logged_scores(work_dir), logged_scores(reference)
    assert sorted(resumed) == sorted(expected) == [2, 4]
    assert all(same(resumed[s][k], expected[s][k]) for s in expected for k in expected[s]), (resumed, expected)
    for name in ROWS:  # the step evaluated again holds the uninterrupted run's predictions
        assert gather_predictions(work_dir / "eval" / "iter_2" / name) == gather_predictions(reference / "eval" / "iter_2" / name)


@pytest.mark.parametrize("breakage", ["missing", "malformed"])
def test_a_bad_benchmark_file_is_one_line_before_launching(bench, tmp_path, breakage):
    """Read and checked before torchrun starts (paths.check_config_paths): one line, exit 2, no rank started."""
    bad = tmp_path / "MME.tsv"
    if breakage == "malformed":  # the answer column dropped
        lines = [line.split("\t") for line in bench["MME"].read_text(encoding="utf-8").splitlines()]
        column = lines[0].index("answer")
        bad.write_text("".join("\t".join(c for i, c in enumerate(cells) if i != column) + "\n" for cells in lines))
    options = dict(OPTIONS, evaluation_benchmarks=[{"data_path": str(bench["heldout_mmbench"])},
                                                   {"data_path": str(bad), "max_rows": 4}])
    proc = run_train(RECIPE, tmp_path / "w", options, **two_ranks())
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert len(errors) == 1 and "tiny_llava_task_finetune_lora.py: evaluation_benchmarks[1]: " in errors[0], proc.stderr
    assert (f"{bad}: benchmark file not found" if breakage == "missing" else f"{bad}: missing column(s) answer") in errors[0]
    assert "torch.distributed.run" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
