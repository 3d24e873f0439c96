"""Batch order: determinism, rank split, modality grouping, exact resume, and what grouping buys."""
from __future__ import annotations

import numpy as np
import pytest

from vlmtune.data.sampler import BatchSampler


def mixed_lengths(n_image=37, n_text=23, seed=0):
    """LLaVA modality lengths: positive for image samples (576 + text), negative for text-only ones."""
    rng = np.random.default_rng(seed)
    image = 576 + rng.integers(20, 400, n_image)
    text = -rng.integers(20, 900, n_text)
    return rng.permutation(np.concatenate([image, text]))


def epoch_batches(lengths, batch_size, world_size, rank, seed=0, epoch=0, group=True):
    sampler = BatchSampler(lengths, batch_size, world_size=world_size, rank=rank, seed=seed, group_by_length=group)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("group", [True, False])
def test_same_seed_and_epoch_same_order_otherwise_different(group):
    lengths = mixed_lengths()
    a = epoch_batches(lengths, 4, 1, 0, seed=1, epoch=3, group=group)
    assert a == epoch_batches(lengths, 4, 1, 0, seed=1, epoch=3, group=group)
    assert a != epoch_batches(lengths, 4, 1, 0, seed=1, epoch=4, group=group)
    assert a != epoch_batches(lengths, 4, 1, 0, seed=2, epoch=3, group=group)


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n_image,n_text,batch_size,world_size", [(37, 23, 4, 1), (37, 23, 2, 3), (7, 7, 4, 1), (5, 0, 2, 2), (0, 9, 3, 2), (1, 1, 1, 2)])
def test_every_rank_batch_is_full_and_len_is_the_batch_count(group, n_image, n_text, batch_size, world_size):
    lengths = mixed_lengths(n_image, n_text)
    for rank in range(world_size):
        sampler = BatchSampler(lengths, batch_size, world_size=world_size, rank=rank, group_by_length=group)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-len(lengths) // (batch_size * world_size))
        assert all(len(b) == batch_size for b in batches)


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_dataset(group, world_size):
    lengths = mixed_lengths()  # 60 samples; 60 % (2 * world_size) may leave a padded last batch
    per_rank = [epoch_batches(lengths, 2, world_size, r, group=group) for r in range(world_size)]
    steps = len(per_rank[0])
    assert all(len(p) == steps for p in per_rank)
    seen = []
    for step in range(steps):
        batch = [i for p in per_rank for i in p[step]]
        if step < steps - 1:  # only the last global batch may wrap around to fill up
            assert len(set(batch)) == len(batch)
        seen += batch
    assert set(seen) == set(range(len(lengths)))
    assert len(seen) - len(lengths) < 2 * world_size  # padding is less than one global batch


def test_no_batch_mixes_modalities_except_one_in_the_tail():
    lengths = mixed_lengths(101, 67)
    for epoch in range(3):
        ranks = [epoch_batches(lengths, 4, 2, r, epoch=epoch) for r in range(2)]
        global_batches = [a + b for a, b in zip(*ranks)]
        mixed = [i for i, g in enumerate(global_batches) if len({bool(lengths[j] > 0) for j in g}) > 1]
        assert len(mixed) <= 1 and all(i >= len(global_batches) - 2 for i in mixed)


def test_grouped_batches_have_similar_lengths():
    """Within a modality, a global batch's lengths are close (sorted mega-batches), unlike a plain shuffle."""
    lengths = mixed_lengths(400, 0)
    spread = lambda group: np.median([np.ptp(lengths[b]) for b in epoch_batches(lengths, 8, 1, 0, group=group)[:-1]])
    assert spread(True) < spread(False) / 4


def test_resume_skips_exactly_the_consumed_batches():
    lengths = mixed_lengths()
    full = epoch_batches(lengths, 3, 2, 1, seed=5, epoch=2)
    for consumed in (0, 1, 7, len(full)):
        sampler = BatchSampler(lengths, 3, world_size=2, rank=1, seed=5)
        sampler.load_state_dict({"epoch": 2, "start": consumed})
        assert sampler.state_dict() == {"epoch": 2, "start": consumed}
        assert list(sampler) == full[consumed:]
    sampler.set_epoch(3)  # a new epoch starts from its first batch
    assert sampler.state_dict() == {"epoch": 3, "start": 0}


def padded_fraction(lengths, batches) -> float:
    """Real tokens / tokens computed when every batch is padded to its longest sample."""
    real = sum(int(np.abs(lengths[b]).sum()) for b in batches)
    computed = sum(int(np.abs(lengths[b]).max()) * len(b) for b in batches)
    return real / computed


def test_grouping_wastes_less_on_padding_than_a_shuffle():
    """Long-tailed lengths (as in LLaVA-Instruct): grouping should compute far fewer padding tokens."""
    rng = np.random.default_rng(0)
    text = np.clip(rng.lognormal(5.0, 0.8, 2000), 16, 2048).astype(int)
    lengths = np.where(rng.random(2000) < 0.7, 576 + text, -text)
    grouped = padded_fraction(lengths, epoch_batches(lengths, 16, 1, 0, group=True))
    shuffled = padded_fraction(lengths, epoch_batches(lengths, 16, 1, 0, group=False))
    assert grouped > 0.85 and grouped > shuffled + 0.25, (grouped, shuffled)


def step_samples(sampler_of, world: int, accumulation: int, epoch: int = 0) -> list[list[int]]:
    """Each optimizer step's samples over all ranks and micro-batches (sorted), for one split of the global batch."""
    ranks = []
    for rank in range(world):
        sampler = sampler_of(world, rank, accumulation)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    steps = len(ranks[0]) // accumulation
    return [sorted(i for r in ranks for m in r[s * accumulation : (s + 1) * accumulation] for i in m) for s in range(steps)]


@pytest.mark.parametrize("group", [True, False])
def test_a_step_trains_the_same_samples_however_the_global_batch_splits(group):
    """The order is one of step batches of G = world x batch x accumulation: 8 ranks x 1, 4 x 2, 2 x 4 and
    1 x 8 micro-batches of 2 samples give every step the same 16 samples (what a resume on other ranks needs)."""
    lengths = mixed_lengths(101, 67)
    make = lambda world, rank, acc: BatchSampler(lengths, 2, world, rank, seed=3, group_by_length=group, accumulative_counts=acc)
    for epoch in (0, 1):
        reference = step_samples(make, 8, 1, epoch)
        assert len(reference) == -(-len(lengths) // 16) and all(len(s) == 16 for s in reference)
        for world, acc in ((4, 2), (2, 4), (1, 8)):
            assert step_samples(make, world, acc, epoch) == reference, (world, acc)
    assert step_samples(make, 4, 1) != step_samples(make, 8, 1)  # another G is another order


def test_packed_steps_take_the_same_packs_however_the_global_batch_splits():
    from vlmtune.data.sampler import PackedBatchSampler

    lengths = mixed_lengths(101, 67)
    make = lambda world, rank, acc: PackedBatchSampler(lengths, 2048, world, rank, seed=3, accumulative_counts=acc)
    reference = step_samples(make, 4, 1)
    assert len(reference) == make(4, 0, 1).steps_per_epoch() > 3
    for world, acc in ((2, 2), (1, 4)):
        assert step_samples(make, world, acc) == reference
