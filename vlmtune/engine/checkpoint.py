"""Checkpoints: what was trained, how to resume, and loading either safely.

A checkpoint at step N is two things in the work dir:
    iter_N.pth   a file: {"format", "state_dict" (trained parameters only, LlavaModel parameter names as XTuner
                 writes them: keymaps.XTUNER_STATE_DICT),
                 "config_text", "config_name", "step", "trainer_state"}; what convert and pretrained_pth read
    iter_N.ds/   DeepSpeed's ZeRO checkpoint of the same step (optimizer shards, LR scheduler, per-rank RNG)
The .ds folder is written first under a temporary name and renamed; iter_N.pth is written last through a
temporary file and os.replace, so a crash mid-save never leaves a file that looks valid. Everything is read
with torch.load(weights_only=True) (vlmtune/weights.py reads iter_N.pth for convert and pretrained_pth):
a .pth from the internet cannot run code here.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from vlmtune.config import Config
from vlmtune.convert import keymaps
from vlmtune.distributed import DistInfo, barrier
from vlmtune.errors import UserError
from vlmtune.weights import DS_TAG, FORMAT, deepspeed_safe_load, rename, safe_load

_ITER = re.compile(r"^iter_(\d+)\.pth$")


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train, by LlavaModel parameter name (gathered under ZeRO-3)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitions parameters: gather them first
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def save_checkpoint(engine, model, work_dir: Path, step: int, trainer_state: dict, cfg: Config, info: DistInfo, keep: int) -> Path:
    """Write iter_<step>.ds/ (all ranks) then iter_<step>.pth (rank 0), atomically; keep the newest `keep`."""
    pth, ds_dir = work_dir / f"iter_{step}.pth", work_dir / f"iter_{step}.ds"
    tmp_dir = work_dir / f".iter_{step}.ds.tmp"
    state = trainable_state_dict(model)  # collective under ZeRO-3: every rank calls it
    if info.is_main and tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    barrier()
    engine.save_checkpoint(str(tmp_dir), tag=DS_TAG, client_state={"config_text": cfg.text, "config_name": cfg.name},
                           exclude_frozen_parameters=True)
    torch.save(_rng_state(), tmp_dir / DS_TAG / f"rng_rank{info.rank}.pt")
    barrier()
    if info.is_main:
        pth.unlink(missing_ok=True)  # an older run's iter_<step>.pth must not outlive the .ds folder replaced here
        if ds_dir.exists():
            shutil.rmtree(ds_dir)
        os.replace(tmp_dir, ds_dir)
        # XTuner's names (CLIP with transformers 4.x's `vision_model.` level): its pth_to_hf reads this file too
        payload = {"format": FORMAT, "state_dict": rename(state, keymaps.XTUNER_STATE_DICT), "config_text": cfg.text, "config_name": cfg.name,
                   "step": step, "trainer_state": trainer_state}
        torch.save(payload, pth.with_suffix(".pth.tmp"))
        os.replace(pth.with_suffix(".pth.tmp"), pth)
        rotate(work_dir, keep)
    barrier()
    return pth


def rotate(work_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (both the .pth and its .ds folder)."""
    if keep <= 0:
        return
    for step in checkpoint_steps(work_dir)[:-keep]:
        (work_dir / f"iter_{step}.pth").unlink(missing_ok=True)
        shutil.rmtree(work_dir / f"iter_{step}.ds", ignore_errors=True)


def checkpoint_steps(work_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `work_dir`, oldest first."""
    if not work_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in work_dir.iterdir() if (m := _ITER.match(p.name)))


def find_resume(work_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume: `auto` = newest in work_dir (None if there is none), else the given path."""
    if resume == "auto":
        steps = checkpoint_steps(work_dir)
        return work_dir / f"iter_{steps[-1]}.pth" if steps else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume {resume}: no such checkpoint file (use an iter_N.pth or 'auto')")
    return path


def load_resume_state(engine, pth: Path, info: DistInfo) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from a checkpoint; return trainer_state."""
    ds_dir = pth.with_suffix(".ds")
    if not (ds_dir / DS_TAG).is_dir():
        raise UserError(f"{pth}: its DeepSpeed folder {ds_dir} is missing, so optimizer state cannot be resumed")
    # DeepSpeed's own loader unpickles its shards with weights_only=False; read them the safe way instead
    engine.checkpoint_engine.load = deepspeed_safe_load
    engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_module_strict=False)
    rng = ds_dir / DS_TAG / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        _set_rng_state(safe_load(rng))
    return safe_load(pth)["trainer_state"]


def _rng_state() -> dict:
    """Torch RNG of this rank (dropout, LoRA dropout); the data order does not use global RNG."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
