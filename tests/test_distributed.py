"""vlmtune/distributed.py without a process group: one process is rank 0 of 1 and collectives are no-ops.
(Several ranks run for real in tests/test_train.py and tests/eval/test_mmbench_run.py.)"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from vlmtune.distributed import all_reduce_sum, barrier, broadcast_from_main, init_gloo, rank_and_world


def test_all_reduce_sum_without_a_process_group_is_a_copy():
    value = torch.tensor([1, 2, 3])
    out = all_reduce_sum(value)
    assert torch.equal(out, value) and out.data_ptr() != value.data_ptr()


def test_without_a_process_group_this_process_is_rank_0_of_1(monkeypatch):
    """Evaluation in one process joins no group; barrier and broadcast then do nothing."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    init_gloo(datetime.timedelta(seconds=5))
    assert not dist.is_initialized() and rank_and_world() == (0, 1)
    barrier()
    value = {"run_dir": "a/b"}
    assert broadcast_from_main(value) is value
