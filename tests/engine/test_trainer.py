"""The loop's pure parts: the LR schedule, the resumable micro-batch stream, token counting.

The loop itself (loss normalisation, accumulation, checkpoints) runs for real in tests/test_train.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.sampler import BatchSampler
from vlmtune.engine.trainer import count_tokens, lr_lambda, micro_batches


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    factor = lr_lambda(100, 0.1)  # 10 warmup steps
    assert factor(0) == 1e-5  # XTuner's LinearLR start_factor
    assert factor(5) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert factor(10) == 1.0  # the peak, right after warmup
    assert factor(55) == pytest.approx(0.5)  # half way through the cosine
    assert factor(100) == pytest.approx(0.0, abs=1e-12) and factor(150) == pytest.approx(0.0, abs=1e-12)
    values = [factor(s) for s in range(101)]
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert all(a > b for a, b in zip(values[10:100], values[11:101]))
    assert factor(70) == pytest.approx(0.5 * (1 + math.cos(math.pi * 60 / 90)))


def test_warmup_steps_round_down():
    assert lr_lambda(10, 0.0)(0) == 1.0  # no warmup: the first step runs at the peak
    one = lr_lambda(8, 0.125)  # int(1.0) = 1 warmup step (what tests/test_train.py relies on)
    assert one(0) == 1e-5 and one(1) == 1.0
    assert lr_lambda(8, 0.1)(0) == 1.0  # int(0.8) = 0


def test_schedule_through_torch_gives_the_rate_of_each_step():
    """As the engine runs it: LambdaLR stepped once per optimizer step; step s (from 1) uses lr * factor(s-1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=0.01)
    factor = lr_lambda(6, 0.34)  # 2 warmup steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    used = []
    for _ in range(6):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([0.01 * factor(s) for s in range(6)])
    assert used[0] == pytest.approx(1e-7) and used[2] == pytest.approx(0.01) and used[-1] < used[3]


def _stream(world: int, rank: int, start: int, n: int, modality_lengths) -> list[tuple[int, list[int]]]:
    sampler = BatchSampler(modality_lengths, 2, world, rank, seed=7, group_by_length=True)
    loader = torch.utils.data.DataLoader(range(len(modality_lengths)), batch_sampler=sampler, collate_fn=list)
    stream = micro_batches(loader, sampler, start)
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_micro_batch_stream_resumes_at_any_position_across_epochs(world, rank):
    """What `--resume` relies on: the stream started at micro-batch k is the tail of the stream from 0."""
    lengths = np.array([300, -40, 620, 580, -90, 610, 700, 20, -15, 640, 655, 600, -30])  # 9 image, 4 text-only
    per_epoch = len(BatchSampler(lengths, 2, world, rank))
    full = _stream(world, rank, 0, 3 * per_epoch, lengths)
    assert [e for e, _ in full] == [0] * per_epoch + [1] * per_epoch + [2] * per_epoch
    assert [b for _, b in full[:per_epoch]] != [b for _, b in full[per_epoch : 2 * per_epoch]]  # reshuffled
    for start in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        assert _stream(world, rank, start, 3 * per_epoch - start, lengths) == full[start:]


def test_count_tokens_counts_targets_and_expanded_image_tokens(tiny_model_config):
    from vlmtune.model.anyres import DEFAULT_PINPOINTS
    from vlmtune.model.build import build_model

    IMG, IGN = IMAGE_TOKEN_INDEX, IGNORE_INDEX
    batch = {
        "input_ids": torch.tensor([[1, IMG, 5, 6, 7, 0], [1, 8, 9, IMG, IMG, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[IGN, IGN, IGN, 6, 7, IGN], [IGN, 8, 9, IGN, IGN, IGN]]),
        "image_sizes": torch.tensor([[213, 320], [320, 213], [30, 40]]),  # (height, width) of the 3 images
    }
    fixed = build_model(tiny_model_config(), for_training=False)
    targets, tokens = count_tokens(batch, fixed.image_lengths)
    assert targets == 4  # labels 6, 7, 8, 9: each is predicted from the token before it
    assert tokens == 10 - 3 + 3 * 576  # real tokens, each image id expanded to CLIP-L/336's 576 positions
    anyres = build_model(tiny_model_config(image_grid_pinpoints=list(DEFAULT_PINPOINTS)), for_training=False)
    # AnyRes: 576 base rows + the unpadded grid, a newline after each row. 213x320 fits the 336x672 pinpoint: a
    # 24x48 map, of which 24x36 covers the image -> 24 * 37; 320x213 and 30x40 are upscaled whichever pinpoint,
    # so the one wasting least, listed first, is the same: 24x16 and 24x32 of it -> 24 * 17 and 24 * 33
    # (transformers' LlavaNextProcessor gives these counts: tests/model/test_anyres.py)
    assert count_tokens(batch, anyres.image_lengths) == (4, 10 - 3 + (576 + 24 * 37) + (576 + 24 * 17) + (576 + 24 * 33))