"""The training loop: one optimizer step = `accumulative_counts` micro-batches on every rank.

Loss normalisation: the model returns the SUM of token losses of a micro-batch. Before a step, every rank
counts the target tokens of its micro-batches and the counts are summed over ranks (N). Each micro-batch
then backpropagates loss_sum * world_size / N: DeepSpeed averages gradients over ranks (/ world_size) and
we tell it not to divide by the accumulation count, so the step's gradient is exactly
d(sum of all token losses of the global batch) / N, whatever the split into micro-batches and ranks.

N is counted from the labels (`count_tokens`), not taken from the model's forward, which returns the same
number (its targets after the image splice: an image adds only IGNORE_INDEX labels): the first backward of a
step needs N for the whole step on every rank, before the step's later micro-batches have run forward.
"""
from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlmtune.config import Config
from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.distributed import DistInfo, all_reduce_sum, gather_lists
from vlmtune.engine import checkpoint
from vlmtune.engine.metrics import Metrics
from vlmtune.errors import UserError


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "segment_ids", "image_sizes")  # segment_ids: packed only


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues exactly."""

    step: int = 0
    samples_seen: int = 0
    skipped: int = 0
    skipped_log: list = field(default_factory=list)
    global_batch: int = 0  # samples (or packs) per optimizer step: what a resume on another number of ranks keeps


def lr_lambda(total_steps: int, warmup_ratio: float):
    """LR factor: linear warmup from ~0 (XTuner's LinearLR start_factor=1e-5), then cosine decay to 0."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return 1e-5 + (1 - 1e-5) * step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def micro_batches(loader, sampler, start: int):
    """Endless stream of (epoch, batch) from micro-batch number `start` on, crossing epochs."""
    per_epoch = len(sampler)
    epoch, offset = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = offset
        for batch in loader:
            yield epoch, batch
        epoch, offset = epoch + 1, 0


def count_tokens(batch: dict, image_lengths) -> tuple[int, int]:
    """(target tokens, real tokens after image expansion) of a collated micro-batch; `image_lengths`:
    LlavaModel.image_lengths (positions per image, from the images' sizes)."""
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    n_images = int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum())
    return targets, int(batch["attention_mask"].sum()) - n_images + sum(image_lengths(batch["image_sizes"]))


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or peak process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fit(engine, loader, sampler, cfg: Config, info: DistInfo, work_dir: Path, state: TrainState,
        total_steps: int, image_lengths, evaluate, logger) -> TrainState:
    """Train from `state.step` to `total_steps` (the LR schedule's length); checkpoint, log and evaluate on the way."""
    tc = cfg.train
    if total_steps <= 0:
        raise UserError(f"nothing to train: {len(sampler)} micro-batches per epoch, accumulative_counts={tc.accumulative_counts}")
    stream = micro_batches(loader, sampler, state.step * tc.accumulative_counts)
    state.global_batch = sampler.step_batch
    metrics = Metrics(work_dir, info.is_main)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not info.is_main, dynamic_ncols=True)
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "samples": 0, "time": time.time(), "steps": 0}
    run_start, start_step = time.time(), state.step
    engine.train()
    try:  # the bar is closed on errors too, so the one-line error starts on its own line
        while state.step < total_steps:
            batches = [next(stream) for _ in range(tc.accumulative_counts)]
            epoch = batches[-1][0]
            skipped = [s for _, b in batches for s in b["skipped"]]
            counts = torch.tensor([[*count_tokens(b, image_lengths), len(b["ids"]), 0] for _, b in batches]).sum(0)
            counts[3] = len(skipped)
            n_targets, n_tokens, n_samples, n_skipped = all_reduce_sum(counts).tolist()
            lr = engine.get_lr()[0]  # the rate this step uses: the scheduler advances inside its last engine.step()
            loss_sum = torch.zeros((), dtype=torch.float64)
            for _, batch in batches:  # the model's target count (discarded) is this batch's share of n_targets
                out_sum, _ = engine(**{k: _to(batch[k], info.device) for k in MODEL_INPUTS if k in batch})
                engine.backward(out_sum * info.world_size / max(n_targets, 1), scale_wrt_gas=False)
                engine.step()
                loss_sum += out_sum.detach().double().cpu()
            state.step += 1
            state.samples_seen += n_samples
            if tc.record_sample_ids:  # the step's sample ids of all ranks, in rank order
                metrics.log_sample_ids(state.step, gather_lists([i for _, b in batches for i in b["ids"]]))
            _account_skipped(state, skipped, n_skipped, total_steps, cfg, logger)
            window["loss"] += float(all_reduce_sum(loss_sum))
            window["targets"] += n_targets
            window["tokens"] += n_tokens
            window["samples"] += n_samples
            window["steps"] += 1
            bar.update(1)
            if state.step % tc.logging_interval == 0 or state.step == total_steps:
                record = _record(engine, lr, state, epoch, total_steps, window, run_start, start_step, info)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                logger.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
                metrics.log(record)
                window = {"loss": 0.0, "targets": 0, "tokens": 0, "samples": 0, "time": time.time(), "steps": 0}
            if evaluate is not None and (state.step % tc.evaluation_freq == 0 or state.step == total_steps):
                with preserved_rng(info.device):  # the run's dropout masks are those of a run without evaluation
                    scores = evaluate(state.step)
                if scores:
                    metrics.log_scores(state.step, scores)
            if state.step % tc.save_steps == 0 or state.step == total_steps:
                path = checkpoint.save_checkpoint(engine, engine.module, work_dir, state.step, state.__dict__, cfg, info, tc.save_total_limit)
                logger.info(f"saved {path}")
    finally:
        bar.close()
    plot = metrics.close()
    if plot is not None:
        logger.info(f"loss curve: {plot}")
    return state


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Python's, numpy's and torch's global RNG states (and the GPU's) as they were before the block: what runs in
    it (evaluation) draws nothing the training would have drawn. The dataloader has its own generator."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _record(engine, lr: float, state: TrainState, epoch: int, total: int, w: dict, run_start: float, start_step: int,
            info: DistInfo) -> dict:
    """The numbers logged for the steps since the last record (`lr`, `grad_norm`: those of the last step)."""
    elapsed = max(time.time() - w["time"], 1e-9)
    per_step = (time.time() - run_start) / max(state.step - start_step, 1)
    grad_norm = engine.get_global_grad_norm()
    return {
        "step": state.step, "total_steps": total, "epoch": epoch,
        "loss": w["loss"] / max(w["targets"], 1),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": w["tokens"] / elapsed,
        "samples_per_s": w["samples"] / elapsed,
        "eta_s": per_step * (total - state.step),
        "peak_mem_gb": peak_memory_gb(info.device),
        "skipped": state.skipped,
    }


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _account_skipped(state: TrainState, skipped: list[dict], n_skipped: int, total_steps: int, cfg: Config, logger) -> None:
    """Log this rank's skipped samples; stop (on every rank alike: `n_skipped` is the global count) once the
    skipped samples exceed `max_bad_sample_fraction` of the samples the whole run will see (extrapolated from
    the steps so far), so a few bad images early in a long run do not end it, a broken dataset does."""
    for s in skipped:
        logger.warning(f"skipped sample {s['id']} (index {s['index']}): {s['kind']}: {s['detail']}")
        if len(state.skipped_log) < 100:
            state.skipped_log.append(s)
    state.skipped += n_skipped
    fraction = cfg.data.max_bad_sample_fraction
    planned = state.samples_seen / max(state.step, 1) * total_steps
    if state.skipped and state.skipped > fraction * planned:
        raise UserError(
            f"{state.skipped} of {state.samples_seen} samples were skipped, over the budget of "
            f"max_bad_sample_fraction={fraction} of the run's ~{int(planned)} samples; "
            f"run `vlmtune data check {cfg.data.data_path} --image-folder {cfg.data.image_folder}` and fix or filter the data"
        )
