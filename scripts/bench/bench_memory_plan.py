"""`vlmtune train --dry-run` against what DeepSpeed ranks really hold, component by component.

A randomly initialised model with the real shapes of a small recipe (a Qwen2-0.5B-shaped LLM + a CLIP-L/336-shaped
encoder, ~0.8B parameters, built from config and saved once) is trained for one step on 2 gloo CPU ranks per
ZeRO stage (vlmtune/engine/memory_census.py: the tensors each rank holds after a step and a backward, each
storage once); the plan (vlmtune/plan.py) is computed for the same config and stage. Figures are bytes per rank
(rank 0; the largest rank where they differ), the ratio measured / planned per component.

    python scripts/bench/bench_memory_plan.py [--root DIR] [--stages zero2 zero3 ...] [--recipes lora qlora ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

REPO = Path(__file__).resolve().parents[2]
# Qwen2-0.5B's published architecture (Qwen/Qwen2-0.5B config.json)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
RECIPES = {  # --cfg-options over tiny_llava_finetune_lora: what trains
    "pretrain": dict(llm_lora=None, visual_encoder_lora=None),
    "lora": dict(),
    "qlora": dict(quantization="4bit"),
}
STAGES = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]


def _grouped(other: dict[str, int]) -> dict[str, int]:
    """Bytes of the unplanned tensors by name, indices folded (`accumulated_grads_in_cpu[17]` ->
    `accumulated_grads_in_cpu[*] (n tensors)`), so a per-parameter buffer list is one entry."""
    groups: dict[str, list[int]] = {}
    for name, size in other.items():
        groups.setdefault(re.sub(r"\[\d+\]", "[*]", name), []).append(size)
    return {(f"{k} ({len(v)} tensors)" if len(v) > 1 else k): sum(v) for k, v in groups.items()}


def make_models(root: Path) -> tuple[Path, Path]:
    """Random Qwen2-0.5B-shaped LLM and CLIP-L/336-shaped vision tower (bf16), saved once under `root`."""
    import torch
    from transformers import AutoConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    llm, clip = root / "llm", root / "clip"
    if not (llm / "config.json").is_file():
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B)).to(torch.bfloat16).save_pretrained(llm)
    if not (clip / "config.json").is_file():
        shipped = REPO / "vlmtune/assets/model_configs/openai/clip-vit-large-patch14-336"
        CLIPVisionModel(AutoConfig.from_pretrained(shipped).vision_config).to(torch.bfloat16).save_pretrained(clip)
    return llm, clip


def options(llm: Path, clip: Path, recipe: str) -> dict:
    return dict(llm_name_or_path=str(llm), visual_encoder_name_or_path=str(clip), torch_dtype="bfloat16",
                use_gradient_checkpointing=False, **RECIPES[recipe])


def measure(stage: str, opts: dict, out: Path) -> dict:
    """The 2-rank census (torchrun) of `stage`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlmtune.engine.memory_census",
           "tiny_llava_finetune_lora", "--deepspeed", f"deepspeed_{stage}", "--out", str(out),
           "--cfg-options", *(f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}" for k, v in opts.items())]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"census {stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def planned(stage: str, opts: dict) -> dict:
    from vlmtune.config import load_config
    from vlmtune.plan import make_plan

    plan = make_plan(load_config("tiny_llava_finetune_lora", opts), f"deepspeed_{stage}", 2, 80)
    s = plan.states
    return {"parameters": s.parameters + s.host_parameters, "gradients": s.gradients + s.host_gradients,
            "optimizer": s.optimizer + s.host_optimizer, "params": sum(p.params for p in plan.parts),
            "trained": sum(p.trained for p in plan.parts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "work_dirs" / "bench_memory_plan"), help="where the random models are saved")
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--recipes", nargs="+", default=["pretrain", "lora"], choices=list(RECIPES))
    args = p.parse_args()
    _common.header(("torch", "deepspeed", "transformers", "peft", "bitsandbytes"))
    llm, clip = make_models(Path(args.root))
    os.environ.setdefault("VLMTUNE_TINY_DIR", args.root)  # the base config's data paths; never read here
    print("| recipe | stage | parameters (all / trained) | component | planned MiB | measured MiB | measured / planned |")
    print("|---|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for stage in args.stages:
                if recipe == "qlora" and stage.startswith("zero3"):
                    continue  # the plan refuses QLoRA under ZeRO-3 (vlmtune/plan.py)
                opts = options(llm, clip, recipe)
                plan = planned(stage, opts)
                ranks = measure(stage, opts, Path(tmp) / f"{recipe}-{stage}.json")["ranks"]
                for component in ("parameters", "gradients", "optimizer"):
                    got = max(r["bytes"][component] for r in ranks)
                    want = plan[component]
                    ratio = f"{got / want:.4f}" if want else ("-" if not got else "inf")
                    print(f"| {recipe} | {stage} | {plan['params']:,} / {plan['trained']:,} | {component} | "
                          f"{want / 2**20:.2f} | {got / 2**20:.2f} | {ratio} |", flush=True)
                other = _grouped(max(ranks, key=lambda r: sum(r["other"].values()))["other"])
                if other:
                    print(f"|  |  |  | other (not planned): {', '.join(f'{k} {v / 2**20:.3f}' for k, v in other.items())} |  |  |  |")
    print(_common.load())


if __name__ == "__main__":
    main()
