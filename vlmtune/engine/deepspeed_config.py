"""DeepSpeed configuration: the vlmtune config's batch/accumulation/clipping/precision written into the chosen
DeepSpeed JSON, so the vlmtune config is the one source of truth.

DeepSpeed does the distributed work of training (ZeRO sharding, gradient reduction); the process group it runs
in is vlmtune/distributed.py's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.config import CONFIG_DIR, ModelConfig, TrainConfig, find_file
from vlmtune.errors import UserError

if TYPE_CHECKING:  # torch itself is imported where it is used: `vlmtune train`'s checks before torchrun do not need it
    import torch

DEEPSPEED_DIR = CONFIG_DIR / "deepspeed"


def resolve_deepspeed(name_or_path: str) -> Path:
    """A DeepSpeed JSON given by path or by shipped name (deepspeed_zero2, ...)."""
    path = find_file(name_or_path, DEEPSPEED_DIR, ".json")
    if path is not None:
        return path
    names = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
    raise UserError(f"--deepspeed {name_or_path!r} is neither a JSON file nor one of: {names}")


def zero_stage(name_or_path: str) -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 when it has none)."""
    path = resolve_deepspeed(name_or_path)
    try:
        return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def check_stage(model: ModelConfig, name_or_path: str) -> None:
    """Refuse, before anything launches, what a ZeRO stage cannot run: a quantized LLM (QLoRA) under ZeRO-3,
    whose partitioning splits bitsandbytes' packed 4-bit/8-bit weights (bnb then fails at the first forward)."""
    if model.quantization and zero_stage(name_or_path) == 3:
        raise UserError(f"quantization={model.quantization!r} (QLoRA) cannot run under --deepspeed {name_or_path}: "
                        "ZeRO-3 partitions the quantized weights bitsandbytes needs whole; use deepspeed_zero2 "
                        "(or deepspeed_zero2_offload), or quantization=None with ZeRO-3")


def deepspeed_config(name_or_path: str, train: TrainConfig, dtype: torch.dtype, world_size: int, device: torch.device,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed JSON with every value vlmtune owns filled in from the vlmtune config; `load_universal`:
    the resume reads a universal checkpoint (engine/checkpoint.py, a changed number of ranks)."""
    import torch

    path = resolve_deepspeed(name_or_path)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("fp16 training is not supported on CPU (DeepSpeed refuses it); use torch_dtype='bfloat16' or 'float32'")
    cfg.update(
        train_micro_batch_size_per_gpu=train.batch_size,
        gradient_accumulation_steps=train.accumulative_counts,
        train_batch_size=train.batch_size * train.accumulative_counts * world_size,
        gradient_clipping=train.max_norm,
        steps_per_print=10**9,  # vlmtune logs; keep DeepSpeed quiet
    )
    if device.type == "cpu":  # the offload stages pin host memory for copies to a GPU: nothing to pin on CPU ranks
        zero = cfg.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(key), dict) and zero[key].get("pin_memory"):
                zero[key] = {**zero[key], "pin_memory": False}
    if load_universal:
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == torch.float16}
    return cfg
