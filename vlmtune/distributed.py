"""The process group, for training and evaluation alike: joining it, where this process sits, barrier, sums.

The processes are started elsewhere (vlmtune/launch.py: torchrun for NPROC_PER_NODE/NNODES, srun for slurm);
each joins the group here from torch's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables, in one of two ways:

    init_distributed  training: through DeepSpeed, nccl on GPUs and gloo on CPU, and a group even for a single
                      process (DeepSpeed wants one)
    init_gloo         evaluation: ranks only pass a path and wait at a barrier, so a gloo group, and only when
                      there are several processes

Both put each rank on the GPU of its local rank. Everything else works with or without a group: a process
without one is rank 0 of 1, and barrier, all-reduce and broadcast do nothing.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlmtune.launch import free_port
from vlmtune.quiet import printed_lines_dropped


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
    """Join (or, for a plain single process, create) the training group: nccl on GPUs, gloo on CPU."""
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


def init_gloo(timeout: datetime.timedelta) -> None:
    """Join the torchrun job over gloo when it has several processes (no group for one).

    For work whose ranks exchange only a few small messages (evaluation: a barrier, a path): gloo holds no
    accelerator memory. `timeout` bounds every wait at a barrier. A rank takes the GPU of its local rank, so
    `cuda` means its own; a single process keeps the current one (a `--device cuda:1` stays where it is).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def destroy_distributed() -> None:
    """Tear the group down, if there is one (on CPU, skipping this makes some runs abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over ranks (a copy; no-op without a group)."""
    value = value.clone()
    if rank_and_world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_lists(items: list) -> list:
    """The concatenation, in rank order, of every rank's `items` (picklable), on every rank."""
    if rank_and_world()[1] == 1:
        return list(items)
    gathered = [None] * rank_and_world()[1]
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object) on every rank; `value` itself without a group."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
