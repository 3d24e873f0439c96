"""A SigLIP model end to end on CPU: the tiny SigLIP recipe (tiny_llava_siglip_task_finetune_lora: no CLS token,
'full' features, 729 tokens per image, LoRA on the LLM and on SigLIP's own layers) trains under ZeRO-2 on 2
ranks, resumes exactly after SIGKILL, converts to both layouts, chats and runs MMBench.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from test_train import (WEIGHT_RTOL, assert_none_left, assert_ok, max_rel_diff, resumed_step, run_train, start_killable,
                        two_ranks, wait_for, weights)

from vlmtune.cli import main as cli

pytestmark = pytest.mark.slow
CONFIG = "tiny_llava_siglip_task_finetune_lora"
OPTIONS = dict(max_steps=6, save_steps=1, save_total_limit=0, warmup_ratio=0.2, logging_interval=1,
               evaluation_freq=1000, group_by_length=False)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("siglip") / "reference"
    assert_ok(run_train(CONFIG, work_dir, OPTIONS, **two_ranks()))
    return work_dir


def test_siglip_trains_on_two_ranks_its_own_layers_only(reference):
    state = weights(reference, 6)
    vision = [k for k in state if k.startswith("visual_encoder.")]
    assert vision and all(".lora_" in k for k in vision) and not any(".head." in k for k in state)
    log = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_siglip_run_killed_with_sigkill_resumes_exactly(reference, tmp_path):
    work_dir = tmp_path / "killed"
    proc = start_killable(CONFIG, work_dir, OPTIONS, **two_ranks())
    wait_for(work_dir / "iter_2.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_none_left(work_dir)
    assert_ok(run_train(CONFIG, work_dir, OPTIONS, "--resume", "auto", **two_ranks()))
    assert 2 <= resumed_step(work_dir) < 6
    assert max_rel_diff(weights(work_dir, 6), weights(reference, 6)) <= WEIGHT_RTOL


def test_siglip_checkpoint_converts_chats_and_runs_mmbench(reference, tiny, tmp_path, capsys):
    pth = reference / "iter_6.pth"
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp_path / "xtuner")]) == 0
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp_path / "hf"), "--save-format", "huggingface"]) == 0
    capsys.readouterr()
    image = tiny.task / "images" / "heldout_0000.png"
    assert cli(["chat", str(tiny.llm), "--llava", str(tmp_path / "xtuner"), "--image", str(image), "--prompt",
                "What colour is the shape in the picture?", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # the answer (6 steps in: possibly empty)
    assert cli(["mmbench", str(tmp_path / "hf"), "--data-path", str(tiny.task / "heldout_mmbench.tsv"),
                "--work-dir", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    (run,) = [p for p in (tmp_path / "eval").iterdir() if p.is_dir()]
    summary = json.loads((run / "heldout_mmbench_acc.json").read_text())
    assert summary["rows"] == summary["predicted_rows"] == 48
