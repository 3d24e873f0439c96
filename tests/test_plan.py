"""`vlmtune train CFG --dry-run` (vlmtune/plan.py): the meta model is the trained model, the shipped recipes
plan offline with their published sizes, bad input is one line, and on 2 real DeepSpeed ranks the planned
parameters, gradients and optimizer states are the bytes the ranks hold (vlmtune/engine/memory_census.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from vlmtune.cli import main as cli
from vlmtune.config import load_config
from vlmtune.model.build import build_meta_model, build_model
from vlmtune.plan import architecture_folder, make_plan

# the published parameter counts of the recipes' models (transformers' count of the hub checkpoints)
PUBLISHED = {"lmsys/vicuna-7b-v1.5": 6_738_415_616, "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
             "Qwen/Qwen2-7B-Instruct": 7_615_616_512, "openai/clip-vit-large-patch14-336": 303_507_456}
TINY_RECIPES = {"pretrain": "tiny_llava_pretrain", "lora": "tiny_llava_finetune_lora",
                "qlora": "tiny_llava_finetune_qlora", "full": "tiny_llava_finetune_full"}


@pytest.mark.parametrize("recipe", list(TINY_RECIPES))
def test_the_meta_model_is_the_model_training_builds(tiny, recipe):
    """Same parameter names, shapes (4-bit ones: their unquantized shape) and trainable flags as build_model's."""
    cfg = load_config(TINY_RECIPES[recipe]).model
    real = dict(build_model(cfg).named_parameters())
    meta = dict(build_meta_model(cfg, cfg.llm_name_or_path, cfg.visual_encoder_name_or_path, torch.float32).named_parameters())
    assert real.keys() == meta.keys()
    for name, param in real.items():
        shape = param.quant_state.shape if getattr(param, "quant_state", None) is not None else param.shape
        assert (tuple(shape), param.requires_grad) == (tuple(meta[name].shape), meta[name].requires_grad), name
    assert any(p.requires_grad for p in real.values())


def test_the_recipes_plan_offline_with_their_published_sizes(capsys):
    """A 7B recipe plans from the shipped config.json files in seconds; the LLM and vision tower have the
    published parameter counts; the accumulation keeps the config's global batch."""
    start = time.monotonic()
    assert cli(["train", "llava_vicuna_7b_v15_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune", "--dry-run",
                "--gpus", "8", "--gpu-memory", "80"]) == 0
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert f"LLM{PUBLISHED['lmsys/vicuna-7b-v1.5']:>28,}" in out
    assert f"vision tower{PUBLISHED['openai/clip-vit-large-patch14-336']:>19,}" in out
    assert "keeps the global batch 128 (8 x batch x accumulation)" in out
    assert elapsed < 60, f"the plan took {elapsed:.1f} s"
    for config in ("llava_llama3_8b_instruct_full_clip_vit_large_p14_336_lora_e1_gpu8_finetune",
                   "llava_qwen2_7b_instruct_siglip_so400m_p14_384_lora_e1_gpu8_finetune"):
        plan = make_plan(load_config(config), "deepspeed_zero3", 8, 80)
        llm = next(p for p in plan.parts if p.name == "LLM")
        assert llm.params == PUBLISHED[load_config(config).model.llm_name_or_path]


def test_fewer_gpus_or_less_memory_shrink_the_micro_batch_and_keep_the_global_batch():
    """Halving the GPU memory lowers the largest micro-batch; the accumulation then makes up the per-GPU batch."""
    from vlmtune.plan import accumulation

    cfg = load_config("llava_vicuna_7b_v15_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune")
    big, small = (make_plan(cfg, "deepspeed_zero2", 8, m) for m in (80, 40))
    assert 0 < small.largest_micro_batch() < big.largest_micro_batch()
    micro, acc = accumulation(small)
    assert micro * acc == cfg.train.batch_size * cfg.train.accumulative_counts and micro <= small.largest_micro_batch()
    assert small.peak(micro) <= 40 * 2**30 < small.peak(small.largest_micro_batch() + 1)


@pytest.mark.parametrize("args, fix", [
    (["--deepspeed", "deepspeed_zero4"], "is neither a JSON file nor one of"),
    (["--gpus", "0"], "--gpus 0: give the number of GPUs"),
    (["--cfg-options", "llm_name_or_path=nowhere/no-such-model"], "point llm_name_or_path at a folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, fix, capsys):
    assert cli(["train", "llava_vicuna_7b_v15_clip_vit_large_p14_336_e1_gpu8_pretrain", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fix in err


def test_a_hub_id_without_a_shipped_config_is_refused(tmp_path):
    """InternLM2's class is remote code: no shipped config; a local folder is used as it is."""
    from vlmtune.errors import UserError

    with pytest.raises(UserError, match="remote-code model such as InternLM2"):
        architecture_folder("internlm/internlm2-chat-7b", "llm_name_or_path")
    assert architecture_folder(str(tmp_path), "llm_name_or_path") == str(tmp_path)


def _census(tiny, stage: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{stage}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLMTUNE_TINY_DIR=str(tiny.root))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlmtune.engine.memory_census",
           "tiny_llava_finetune_lora", "--deepspeed", f"deepspeed_{stage}", "--out", str(out),
           "--cfg-options", "torch_dtype=bfloat16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["ranks"]


@pytest.mark.e2e  # in CI: the plan checked against real ranks (about 60 s)
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_the_plan_is_what_two_deepspeed_ranks_hold(tiny, stage, tmp_path):
    """LoRA finetune (LLM and CLIP LoRA, projector; frozen LLM and CLIP), bf16, 2 gloo ranks: each rank's
    parameters, gradients and optimizer states, summed over the tensors it holds, against the plan.

    Parameters: exact (ZeRO-3: every parameter's partition plus the whole ones under the persistence threshold).
    Optimizer: the plan + Adam's step counter (4 bytes per parameter group). Gradients: exact under ZeRO-3; under
    ZeRO-2 a rank holds whole the gradient of the parameter its partition boundary cuts, so the difference is at
    most that parameter (w x the largest trained tensor)."""
    plan = make_plan(load_config("tiny_llava_finetune_lora", {"torch_dtype": "bfloat16"}), f"deepspeed_{stage}", 2, 80)
    s = plan.states
    ranks = _census(tiny, stage, tmp_path)
    largest = 2 * max(p.largest_trained for p in plan.parts)
    for measured in (r["bytes"] for r in ranks):
        print(f"\n{stage}: planned params {s.parameters} grads {s.gradients} optimizer {s.optimizer}; measured {measured}")
        assert measured["parameters"] == s.parameters
        assert 0 <= measured["optimizer"] - s.optimizer <= 16
        if stage == "zero3":
            assert measured["gradients"] == s.gradients
        else:
            assert abs(measured["gradients"] - s.gradients) <= largest
        assert measured["other"] < 0.01 * sum(measured.values())  # nothing big left unclassified
