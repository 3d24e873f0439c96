"""The LLaVA-family tiny recipes end to end on CPU, each: trains under ZeRO-2 on 2 ranks, resumes exactly after
SIGKILL, converts to both layouts, chats and runs MMBench.

- siglip: tiny_llava_siglip_task_finetune_lora (no CLS token, 'full' features, 729 tokens per image, LoRA on
  the LLM and on SigLIP's own layers; its pooling head is not built);
- multi_image: tiny_llava_multi_image_task_finetune_lora (two-image records whose tags sit inside the text,
  one-image and text-only records, mixed in the same batches); chat gets two images;
- anyres: tiny_llava_anyres_task_finetune_lora (images of six aspect ratios tiled into different grids, so each
  batch mixes token counts; the image_newline vector trains with the projector); the huggingface export is a
  LlavaNext folder, which chat and mmbench load.
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

pytestmark = pytest.mark.e2e
RECIPES = {"siglip": "tiny_llava_siglip_task_finetune_lora", "multi_image": "tiny_llava_multi_image_task_finetune_lora",
           "anyres": "tiny_llava_anyres_task_finetune_lora"}
OPTIONS = dict(max_steps=6, save_steps=1, save_total_limit=0, warmup_ratio=0.2, logging_interval=1,
               evaluation_freq=1000, group_by_length=False)


@pytest.fixture(scope="module", params=list(RECIPES))
def reference(request, tiny, tmp_path_factory):
    """(recipe, work dir of an uninterrupted 6-step run on 2 ranks)."""
    work_dir = tmp_path_factory.mktemp(request.param) / "reference"
    assert_ok(run_train(RECIPES[request.param], work_dir, OPTIONS, **two_ranks()))
    return request.param, work_dir


def test_trains_on_two_ranks(reference):
    recipe, work_dir = reference
    state = weights(work_dir, 6)
    vision = [k for k in state if k.startswith("visual_encoder.")]
    assert vision and all(".lora_" in k for k in vision) and not any(".head." in k for k in state)
    log = [json.loads(line) for line in (work_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    if recipe == "multi_image":  # every batch kind went through: 2-image, 1-image and text-only records
        assert "no_trainable_tokens" not in (work_dir / "train.log").read_text()
    if recipe == "anyres":  # the row separator trained: it moved from where step 1 left it
        assert state["image_newline"].shape == (64,)
        assert not torch.equal(state["image_newline"], weights(work_dir, 1)["image_newline"])


def test_killed_with_sigkill_resumes_exactly(reference, tmp_path):
    recipe, ref_dir = reference
    work_dir = tmp_path / "killed"
    proc = start_killable(RECIPES[recipe], work_dir, OPTIONS, **two_ranks())
    wait_for(work_dir / "iter_2.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_none_left(work_dir)
    assert_ok(run_train(RECIPES[recipe], work_dir, OPTIONS, "--resume", "auto", **two_ranks()))
    assert 2 <= resumed_step(work_dir) < 6
    assert max_rel_diff(weights(work_dir, 6), weights(ref_dir, 6)) <= WEIGHT_RTOL


def test_checkpoint_converts_chats_and_runs_mmbench(reference, tiny, tmp_path, capsys):
    recipe, work_dir = reference
    pth = work_dir / "iter_6.pth"
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp_path / "xtuner")]) == 0
    assert cli(["convert", "pth_to_hf", str(pth), str(tmp_path / "hf"), "--save-format", "huggingface"]) == 0
    model_type = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    assert model_type == ("llava_next" if recipe == "anyres" else "llava")
    capsys.readouterr()
    images = [str(tiny.task / "images" / f"heldout_000{i}.png") for i in range(2 if recipe == "multi_image" else 1)]
    prompt = "What colour is the shape in the second picture?" if recipe == "multi_image" else "What colour is the shape?"
    assert cli(["chat", str(tiny.llm), "--llava", str(tmp_path / "xtuner"), *(a for i in images for a in ("--image", i)),
                "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # the answer (6 steps in: possibly empty)
    assert cli(["mmbench", str(tmp_path / "hf"), "--data-path", str(tiny.task / "heldout_mmbench.tsv"),
                "--work-dir", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    (run,) = [p for p in (tmp_path / "eval").iterdir() if p.is_dir()]
    summary = json.loads((run / "heldout_mmbench_acc.json").read_text())
    assert summary["rows"] == summary["predicted_rows"] == 48
