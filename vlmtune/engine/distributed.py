"""Process group and DeepSpeed configuration.

DeepSpeed does the distributed work (ZeRO sharding, gradient reduction); this module only starts and stops
the process group and writes the vlmtune config's batch/accumulation/clipping/precision into the chosen
DeepSpeed JSON, so the vlmtune config is the one source of truth.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vlmtune.config import CONFIG_DIR, TrainConfig, find_file
from vlmtune.engine.launch import free_port
from vlmtune.errors import UserError
from vlmtune.quiet import printed_lines_dropped

DEEPSPEED_DIR = CONFIG_DIR / "deepspeed"


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join (or, for a plain single process, create) the process group: nccl on GPUs, gloo on CPU."""
    import deepspeed

    if "RANK" not in os.environ:  # one process without a launcher: DeepSpeed still wants a group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    with printed_lines_dropped():  # DeepSpeed print()s that its shared-memory op was built
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    """Tear the group down (on CPU, skipping this makes some runs abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over ranks (a copy; no-op without a group)."""
    value = value.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_deepspeed(name_or_path: str) -> Path:
    """A DeepSpeed JSON given by path or by shipped name (deepspeed_zero2, ...)."""
    path = find_file(name_or_path, DEEPSPEED_DIR, ".json")
    if path is not None:
        return path
    names = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
    raise UserError(f"--deepspeed {name_or_path!r} is neither a JSON file nor one of: {names}")


def deepspeed_config(name_or_path: str, train: TrainConfig, dtype: torch.dtype, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON with every value vlmtune owns filled in from the vlmtune config."""
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
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == torch.float16}
    return cfg
