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

Resuming on another number of ranks (an 8-GPU job back on 4): the global batch G (trainer_state) is kept by
rescaling accumulative_counts (`keep_global_batch`), so the sampler's order of step batches, the LR schedule
and the samples already seen carry over; the optimizer state, sharded over the old ranks, is re-sharded by
DeepSpeed's universal checkpoint (`universal_folder`: ds_to_universal, run once by rank 0 into
iter_N.universal/, its torch.load calls routed through the weights-only loader).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from vlmtune.config import Config
from vlmtune.convert import keymaps
from vlmtune.distributed import DistInfo, barrier
from vlmtune.errors import UserError
from vlmtune.weights import (DS_TAG, FORMAT, MODEL_STATES, deepspeed_safe_load, rename, rename_either, safe_load,
                             safe_torch_load_in)

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
        shutil.rmtree(pth.with_suffix(".universal"), ignore_errors=True)  # nor its universal conversion
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
        for folder in (".ds", ".universal"):
            shutil.rmtree(work_dir / f"iter_{step}{folder}", ignore_errors=True)


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


def read_trainer_state(pth: Path) -> dict:
    """The trainer_state of a checkpoint (TrainState fields), checking its DeepSpeed folder is there."""
    if not (pth.with_suffix(".ds") / DS_TAG).is_dir():
        raise UserError(f"{pth}: its DeepSpeed folder {pth.with_suffix('.ds')} is missing, so optimizer state cannot be resumed")
    return safe_load(pth, mmap=True)["trainer_state"]


def check_trained_parameters(pth: Path, model: torch.nn.Module) -> None:
    """The checkpoint trained exactly the parameters the config trains, in the same shapes. DeepSpeed's own
    load would skip a missing one silently (its module load cannot be strict: frozen weights are not saved)
    and fail on a shape in a traceback. Call before DeepSpeed partitions the model (ZeRO-3)."""
    saved = {k: tuple(v.shape) for k, v in rename_either(safe_load(pth, mmap=True)["state_dict"], keymaps.XTUNER_STATE_DICT).items()}
    ours = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
    reshaped = [n for n in sorted(ours.keys() & saved.keys()) if saved[n] != ours[n]]
    problems = ([f"{len(missing)} trained here but not in it (e.g. {missing[0]})"] if missing else []) + \
               ([f"{len(unexpected)} in it but not trained here (e.g. {unexpected[0]})"] if unexpected else []) + \
               [f"{len(reshaped)} of other shapes (e.g. {n}: {saved[n]} in it, {ours[n]} here)" for n in reshaped[:1]]
    if problems:
        raise UserError(f"--resume {pth}: it trained other parameters than this config does: {'; '.join(problems)}; "
                        "resume with the config it was trained with")


def saved_world_size(pth: Path) -> int | None:
    """How many ranks wrote the DeepSpeed folder of `pth` (one ZeRO optimizer shard each); None for a run without
    ZeRO (a DeepSpeed JSON of stage 0), whose optimizer state is whole in the model-states file: any number of
    ranks loads it."""
    folder = pth.with_suffix(".ds") / DS_TAG
    shards = len(list(folder.glob("*zero_pp_rank_*_optim_states.pt")))
    if not shards and (folder / MODEL_STATES).is_file():
        return None
    if not shards:
        raise UserError(f"{pth}: {pth.with_suffix('.ds') / DS_TAG} holds no ZeRO optimizer shard "
                        "(*zero_pp_rank_*_optim_states.pt), so the run cannot be resumed from it; resume an earlier checkpoint")
    return shards


def resume_accumulation(pth: Path, cfg: Config, world_size: int) -> tuple[int, int]:
    """(accumulative_counts that makes world_size x micro-batch x accumulative_counts the checkpoint's global batch
    G, the number of ranks that saved it). A checkpoint older than the `global_batch` record had the config's own
    G. Where no whole accumulative_counts gives G, one line lists the numbers of ranks and batch sizes that would."""
    saved, saved_world, per_rank = read_trainer_state(pth), saved_world_size(pth), cfg.micro_batch
    g = saved.get("global_batch") or (saved_world or world_size) * per_rank * cfg.train.accumulative_counts
    accumulation, rest = divmod(g, world_size * per_rank)
    if rest or not accumulation:
        worlds = [w for w in range(1, g + 1) if g % (w * per_rank) == 0]
        sizes = [b for b in range(1, g + 1) if g % (world_size * b) == 0]
        fixes = [f"on {' or '.join(map(str, worlds))} rank(s)"] if worlds else []
        if sizes and not cfg.data.pack_to_max_length:
            fixes.append(f"with --cfg-options batch_size={' or '.join(map(str, sizes))}")
        fix = "resume " + ", or ".join(fixes) if fixes else f"resume with ranks x batch_size dividing {g}"
        raise UserError(f"--resume {pth}: its global batch is {g} {'packs' if cfg.data.pack_to_max_length else 'samples'} "
                        f"(saved on {saved_world or 'unknown'} rank(s)), which {world_size} rank(s) x {per_rank} per micro-batch x a whole "
                        f"accumulative_counts cannot make: {fix}")
    return accumulation, saved_world


def keep_global_batch(cfg: Config, pth: Path, world_size: int, logger) -> tuple[Config, int | None]:
    """(`cfg` with the accumulative_counts that keeps the checkpoint's global batch, said in the log when it changed;
    the number of ranks that saved the checkpoint)."""
    accumulation, saved_world = resume_accumulation(pth, cfg, world_size)
    if accumulation != cfg.train.accumulative_counts:
        logger.warning(f"--resume {pth.name}: {world_size} rank(s), the checkpoint had {saved_world or 'unknown'}: accumulative_counts "
                       f"{cfg.train.accumulative_counts} -> {accumulation} keeps its global batch")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, accumulative_counts=accumulation))
    return cfg, saved_world


def universal_folder(pth: Path, info: DistInfo, names: set[str]) -> Path:
    """iter_N.universal/: DeepSpeed's universal checkpoint of iter_N.ds (each parameter's fp32 weights and Adam
    moments whole, so any number of ranks can re-shard them), written once by rank 0 through a temporary folder.
    ds_to_universal's torch.load calls are routed through the weights-only loader, which also requires every
    parameter a file names to be one of the model's `names`: the converter makes a folder per name, so a name
    such as '..' from a hostile file must never reach it."""
    from deepspeed.checkpoint import deepspeed_checkpoint, ds_to_universal, zero_checkpoint

    out = pth.with_suffix(".universal")
    if info.is_main and not (out / DS_TAG / "zero").is_dir():
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(pth.with_suffix(".ds") / DS_TAG), output_folder=str(tmp / DS_TAG),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # plain data parallelism: no tensor-parallel patterns
        try:
            with safe_torch_load_in(ds_to_universal, deepspeed_checkpoint, zero_checkpoint, load=_only_names(names)), \
                    contextlib.redirect_stdout(sys.stderr):  # its progress lines
                ds_to_universal.main(args)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, out)
    barrier()
    return out


def _only_names(names: set[str]):
    """deepspeed_safe_load, refusing a model-states or optimizer file that names a parameter not in `names`
    (module state, param_shapes, ZeRO-1/2 param_slice_mappings: where ds_to_universal takes its folder names)."""

    def load(path, map_location=None, **_):
        state = deepspeed_safe_load(path, map_location)
        if isinstance(state, dict):
            optim = state.get("optimizer_state_dict")
            groups = [state.get("module") or {}, *(state.get("param_shapes") or []),
                      *((optim.get("param_slice_mappings") or []) if isinstance(optim, dict) else [])]
            unknown = sorted({str(n) for group in groups for n in group} - names)
            if unknown:
                raise UserError(f"{path}: names parameters this model does not have ({', '.join(map(repr, unknown[:3]))}"
                                f"{', ...' if len(unknown) > 3 else ''}); resume a checkpoint of this config")
        return state

    return load


def load_resume_state(engine, pth: Path, info: DistInfo, universal: Path | None = None) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from a checkpoint (from its `universal`
    conversion when the number of ranks changed); return trainer_state. A rank the checkpoint did not have
    keeps its seeded RNG."""
    from deepspeed.checkpoint import universal_checkpoint
    from deepspeed.runtime import base_optimizer
    from deepspeed.runtime.zero import stage3

    ds_dir = universal or pth.with_suffix(".ds")
    trainer_state = read_trainer_state(pth)
    # DeepSpeed's own loaders unpickle with weights_only=False; read them the safe way instead
    engine.checkpoint_engine.load = deepspeed_safe_load
    with safe_torch_load_in(universal_checkpoint, base_optimizer, stage3):
        engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_module_strict=False)
    rng = pth.with_suffix(".ds") / DS_TAG / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        _set_rng_state(safe_load(rng))
    return trainer_state


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
