"""Resuming reads DeepSpeed's optimizer shards with weights_only=True plus an allow-list of DeepSpeed's own
data classes: real shard contents load, a shard carrying code is refused with a one-line UserError."""
from __future__ import annotations

import os

import pytest
import torch

from vlmtune.engine.checkpoint import deepspeed_safe_load
from vlmtune.errors import UserError


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_deepspeed_data_classes_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "exp_avg": torch.ones(3)}
    torch.save(state, tmp_path / "optim.pt")
    loaded = deepspeed_safe_load(str(tmp_path / "optim.pt"))
    assert loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"].numel == 4
    assert torch.equal(loaded["exp_avg"], torch.ones(3))


def test_a_shard_with_code_is_refused(tmp_path):
    torch.save({"optimizer_state_dict": _RunsCode()}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="refused to load"):
        deepspeed_safe_load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
