"""Resuming reads DeepSpeed's optimizer shards with weights_only=True plus an allow-list of DeepSpeed's own
data classes: real shard contents load, a shard carrying code is refused with a one-line UserError."""
from __future__ import annotations

import os

import pytest
import torch

from vlmtune.weights import deepspeed_safe_load
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


# ---- a real resume: every file DeepSpeed reads goes through the safe loader -----------------------------------

SPY = """
import atexit, json, os, sys, torch
calls, real = [], torch.load
def spy(f, *args, **kwargs):  # torch.load as DeepSpeed, transformers and vlmtune call it; records each call
    path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else f.name  # a path, or an open file
    calls.append([os.path.abspath(path), kwargs.get("weights_only")])
    return real(f, *args, **kwargs)
torch.load = spy
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(calls)))
from vlmtune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _train(work_dir, *extra, spy=None):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    argv = ["train", "tiny_llava_pretrain", "--work-dir", str(work_dir), *extra, "--cfg-options", "max_steps=2",
            "save_steps=1", "save_total_limit=0", "batch_size=1", "evaluation_freq=1000", "warmup_ratio=0.5"]
    cmd = [sys.executable, "-c", SPY, str(spy), *argv] if spy else [sys.executable, "-m", "vlmtune", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("resume_security") / "run"
    run = _train(work_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    return work_dir


def test_a_real_resume_reads_every_deepspeed_file_weights_only(trained, tmp_path):
    import json
    import shutil

    work_dir = tmp_path / "run"
    shutil.copytree(trained, work_dir)
    calls_file = tmp_path / "calls.json"
    run = _train(work_dir, "--resume", str(work_dir / "iter_1.pth"), spy=calls_file)
    assert run.returncode == 0, run.stderr[-3000:]
    calls = json.loads(calls_file.read_text())
    ds_files = {str(p) for p in (work_dir / "iter_1.ds").rglob("*.pt")}
    assert len(ds_files) >= 3  # model states, optimizer states, vlmtune's rng file
    assert ds_files <= {path for path, _ in calls}, f"a DeepSpeed file was read some other way: {calls}"
    assert [c for c in calls if c[1] is not True] == []  # no torch.load without weights_only=True


def test_a_real_resume_refuses_an_optimizer_shard_that_runs_code(trained, tmp_path):
    import shutil

    work_dir = tmp_path / "run"
    shutil.copytree(trained, work_dir)
    marker = tmp_path / "pwned"
    shard = next((work_dir / "iter_1.ds").rglob("*optim_states.pt"))
    state = torch.load(shard, weights_only=False)  # the test's own file: it may
    state["optimizer_state_dict"]["hostile"] = _WritesMarker(marker)
    torch.save(state, shard)
    run = _train(work_dir, "--resume", str(work_dir / "iter_1.pth"))
    errors = [line for line in run.stderr.splitlines() if line.startswith("vlmtune: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "refused to load" in errors[0] and shard.name in errors[0]
    assert not marker.exists()


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))
