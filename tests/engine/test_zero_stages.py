"""ZeRO-3 and the other DeepSpeed stages for real: 2 CPU ranks (gloo), through the CLI (issue 17).

ZeRO-3 partitions every parameter, the frozen LLM and CLIP included, so what it must get right differs from
ZeRO-2: gathering the frozen weights for each forward on every rank, the blank-image term of text-only
batches (the mixed multi-image recipe has text-only records), saving gathered iter_N.pth files, and a
`.ds` folder whose weights are split across the ranks' files (read by DeepSpeed's zero_to_fp32 through the
weights-only loader: vlmtune/weights.py).
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from test_train import (RUN_TIMEOUT, assert_none_left, assert_ok, max_rel_diff, records, resumed_step, run_train,
                        train_cmd, train_env, two_ranks, wait_for, weights)

from vlmtune.cli import main as cli
from vlmtune.weights import load_trained_weights

pytestmark = pytest.mark.e2e
OPTIONS = dict(max_steps=4, save_steps=1, save_total_limit=0, warmup_ratio=0.25, logging_interval=1,
               evaluation_freq=1000, group_by_length=False)
RECIPES = {"lora": "tiny_llava_multi_image_task_finetune_lora", "full": "tiny_llava_task_finetune_full"}
# ZeRO-3 reduce-scatters gradients where ZeRO-2 all-reduces them, summing in another order: the gradients agree
# to fp32 rounding, not bit for bit, and Adam (m / sqrt(v)) magnifies that where a gradient is near zero. Largest
# relative difference of a tensor after 4 steps, measured: 5.9e-4 (LoRA: a k_proj lora_A); losses agree to 1e-6.
ZERO3_RTOL = 2e-3
LOSS_RTOL = 1e-5
# An attention key bias adds the same q . b to every score of a query, which softmax ignores: its gradient is 0
# up to rounding (~1e-10), and Adam turns that noise into steps of ~lr in either direction. Those tensors are
# compared for staying noise (tiny), not for equality.
ZERO_GRADIENT = ".self_attn.k_proj.bias"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """run(stage, recipe) -> work dir of a 4-step 2-rank run under deepspeed_<stage>, each run once."""
    root, done = tmp_path_factory.mktemp("stages"), {}

    def run(stage: str, recipe: str):
        if (stage, recipe) not in done:
            work_dir = root / f"{recipe}-{stage}"
            assert_ok(run_train(RECIPES[recipe], work_dir, OPTIONS, "--deepspeed", f"deepspeed_{stage}", **two_ranks()))
            done[stage, recipe] = work_dir
        return done[stage, recipe]

    return run


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_zero3_trains_the_weights_zero2_trains(trained, recipe):
    """Same seed and data: after 4 steps every trained tensor under ZeRO-3 equals ZeRO-2's within fp32 rounding
    (LoRA over a frozen, partitioned LLM and CLIP with text-only batches; the whole LLM and CLIP)."""
    zero2, zero3 = weights(trained("zero2", recipe), 4), weights(trained("zero3", recipe), 4)
    losses = [records(trained(stage, recipe)) for stage in ("zero2", "zero3")]
    for step in range(1, 5):
        assert losses[1][step]["loss"] == pytest.approx(losses[0][step]["loss"], rel=LOSS_RTOL), step
    first = weights(trained("zero2", recipe), 1)
    assert max_rel_diff(zero2, first) > 1e-3  # the comparison is over weights that moved
    noise = [k for k in zero2 if k.endswith(ZERO_GRADIENT)]
    assert all(max(zero2[k].abs().max(), zero3[k].abs().max()) < 1e-3 for k in noise)
    zero2, zero3 = ({k: v for k, v in w.items() if k not in noise} for w in (zero2, zero3))
    diff = max_rel_diff(zero3, zero2)
    print(f"\nZeRO-3 vs ZeRO-2, {recipe}: max relative difference {diff:.2e} over {len(zero2)} tensors")
    assert diff <= ZERO3_RTOL


def test_a_zero3_folder_reads_as_its_pth_and_converts(trained, tmp_path, capsys):
    """The iter_N.ds folder of a ZeRO-3 run (a shard per rank) gives the trained weights of iter_N.pth (gathered
    at save), and `convert pth_to_hf` takes either."""
    work_dir = trained("zero3", "full")
    from_folder, config = load_trained_weights(work_dir / "iter_4.ds")
    from_pth, _ = load_trained_weights(work_dir / "iter_4.pth")
    assert config is not None and from_folder.keys() == from_pth.keys() and len(from_pth) > 20
    assert all(torch.equal(from_folder[k].to(from_pth[k].dtype), from_pth[k]) for k in from_pth)
    for source in ("iter_4.ds", "iter_4.pth"):
        assert cli(["convert", "pth_to_hf", str(work_dir / source), str(tmp_path / source)]) == 0
    assert "saved xtuner layout" in capsys.readouterr().out


def test_zero3_killed_with_sigkill_resumes_exactly(trained, tmp_path):
    reference = trained("zero3", "lora")
    work_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(RECIPES["lora"], work_dir, OPTIONS, "--deepspeed", "deepspeed_zero3"),
                            env=train_env(**two_ranks()), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(work_dir / "iter_2.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_none_left(work_dir)
    assert_ok(run_train(RECIPES["lora"], work_dir, OPTIONS, "--deepspeed", "deepspeed_zero3", "--resume", "auto",
                        **two_ranks()))
    assert 2 <= resumed_step(work_dir) < 4
    assert max_rel_diff(weights(work_dir, 4), weights(reference, 4)) <= 1e-5


def test_qlora_under_zero3_is_refused_before_launch(tiny, tmp_path):
    """bitsandbytes cannot use 4-bit weights ZeRO-3 has partitioned: one line naming the stages that work,
    before torchrun starts (no rank ever runs)."""
    work_dir = tmp_path / "qlora3"
    for stage in ("deepspeed_zero3", "deepspeed_zero3_offload"):
        proc = subprocess.run(train_cmd("tiny_llava_task_finetune_qlora", work_dir, {"max_steps": 1}, "--deepspeed", stage),
                              env=train_env(**two_ranks()), capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert "quantization='4bit'" in line and "deepspeed_zero2" in line and stage in line
        assert not work_dir.exists()


STAGES = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
MATRIX = {"pretrain": "tiny_llava_task_pretrain", "lora": "tiny_llava_task_finetune_lora",
          "full": "tiny_llava_task_finetune_full"}


@pytest.mark.slow  # 15 runs of ~12 s: `bash scripts/test.sh --slow` (zero2 and zero3 run in CI above)
@pytest.mark.parametrize("recipe", list(MATRIX))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_every_recipe(stage, recipe, tiny, tmp_path):
    """Each shipped DeepSpeed stage (the offload ones build DeepSpeed's cpu_adam and run with pin_memory off on
    CPU) trains the pretrain, the LoRA and the full finetune for 2 steps on 2 ranks: finite losses, and an
    iter_2.pth holding every trained parameter of the model, moved from step 1."""
    from vlmtune.config import load_config
    from vlmtune.model.build import build_model

    options = dict(OPTIONS, max_steps=2)
    assert_ok(run_train(MATRIX[recipe], tmp_path, options, "--deepspeed", f"deepspeed_{stage}", **two_ranks()))
    log = records(tmp_path)
    assert sorted(log) == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values())
    model = build_model(load_config(MATRIX[recipe]).model, for_training=True)
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    first, last = weights(tmp_path, 1), weights(tmp_path, 2)
    assert trained == set(last) and max_rel_diff(last, first) > 0
