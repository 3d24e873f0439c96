"""Checkpoints: what was trained, how to resume, and loading either safely.

A checkpoint at step N is two things in the work dir:
    iter_N.pth   a file: {"format", "state_dict" (trained parameters only, LlavaModel parameter names),
                 "config_text", "config_name", "step", "trainer_state"}; what convert and pretrained_pth read
    iter_N.ds/   DeepSpeed's ZeRO checkpoint of the same step (optimizer shards, LR scheduler, per-rank RNG)
The .ds folder is written first under a temporary name and renamed; iter_N.pth is written last through a
temporary file and os.replace, so a crash mid-save never leaves a file that looks valid. Everything is read
with torch.load(weights_only=True): a .pth from the internet cannot run code here.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from vlmtune.config import Config, config_from_text
from vlmtune.engine.distributed import DistInfo, barrier
from vlmtune.errors import UserError

FORMAT = "vlmtune-ckpt-v1"
DS_TAG = "ckpt"
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
        payload = {"format": FORMAT, "state_dict": state, "config_text": cfg.text, "config_name": cfg.name,
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


def safe_load(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; anything that needs code to unpickle is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file contains pickled code or objects, not only weights "
                        f"({str(e).splitlines()[0][:200]}); only load checkpoints you trust") from None
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None


def load_trained_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config | None]:
    """(trained parameters, saved config) from an iter_N.pth file or a DeepSpeed ZeRO checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        return _load_zero_dir(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    payload = safe_load(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return payload["state_dict"], config_from_text(payload["config_text"], str(path), payload["config_name"])
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, None  # a bare state dict (e.g. a projector exported by another tool)
    raise UserError(f"{path}: not a vlmtune checkpoint (no 'state_dict'); pass iter_N.pth or a ZeRO folder")


def _load_zero_dir(path: Path) -> tuple[dict[str, torch.Tensor], Config | None]:
    """Trained weights from DeepSpeed's model-states file (saved with exclude_frozen_parameters)."""
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else DS_TAG
    states = path / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise UserError(f"{path}: not a DeepSpeed checkpoint folder (no {tag}/mp_rank_00_model_states.pt)")
    payload = safe_load(states)
    if payload.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 3:
        raise UserError(f"{path}: ZeRO-3 folders hold sharded weights; convert the matching iter_N.pth file instead")
    config = config_from_text(payload["config_text"], str(states), payload["config_name"]) if "config_text" in payload else None
    # "module" also holds the frozen 4-bit weights' quantization state (absmax, quant_map, ... of a QLoRA LLM);
    # "param_shapes" names the parameters the optimizer trained, which is what iter_N.pth holds
    trained = {name for group in payload["param_shapes"] for name in group}
    return {k: v for k, v in payload["module"].items() if k in trained}, config


def load_into_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state_dict` into `model`; error on unknown keys, return trainable params it did not cover."""
    params = dict(model.named_parameters())
    unexpected = [k for k in state_dict if k not in params]
    if unexpected:
        raise UserError(f"{source}: {len(unexpected)} weights do not fit this model (first: {unexpected[0]!r}); "
                        "was it trained with a different config (LoRA settings, LLM, projector depth)?")
    wrong = [k for k, v in state_dict.items() if v.shape != params[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{source}: {len(wrong)} weights have other shapes than this model's (first: {k!r} "
                        f"{tuple(state_dict[k].shape)} vs {tuple(params[k].shape)}); it was trained with a different "
                        "config (LoRA rank, LLM, projector): use the config saved with the checkpoint")
    with torch.no_grad():
        for name, value in state_dict.items():
            params[name].copy_(value.to(params[name].dtype))
    return [n for n, p in params.items() if p.requires_grad and n not in state_dict]


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


def deepspeed_safe_load(path: str, map_location=None) -> dict:
    """Load a DeepSpeed shard with weights_only=True, allowing only the plain data classes DeepSpeed stores
    in optimizer states (its loss scaler, the ZeRO stage enum, fragment addresses); any other pickled
    object is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return safe_load(Path(path), map_location)


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
