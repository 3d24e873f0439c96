"""Batch order: random or modality-aware length-grouped, split across ranks, resumable mid-epoch.

The epoch's order is a list of optimizer-step batches: G = world_size x batch_size x accumulative_counts
indices each, computed by every rank from (seed, epoch, G) alone. A step batch is cut into accumulative_counts
micro global batches of world_size x batch_size consecutive indices, and rank r takes [r::world_size] of each,
so ranks get disjoint samples of similar length. Because the order depends on G and not on how G splits, a run
resumed on another number of ranks (with accumulative_counts rescaled to keep G, engine/checkpoint.py) trains
step s on the same samples as the run that saved the checkpoint. Grouping follows XTuner's
LengthGroupedSampler (mega-batches of up to 50 global batches sorted by length) and LLaVA's modality split
(image and text-only samples never share a batch, except in the leftover tail: the last one or two batches,
made of the short remainders of both modalities).

PackedBatchSampler is the token-budget alternative (`pack_to_max_length`): each step, each rank gets one
pack of whole samples that `collate_packed` turns into one sequence of at most `max_tokens` tokens; an
optimizer step takes G = world_size x accumulative_counts packs, consecutive in the epoch's order.
"""
from __future__ import annotations

import bisect

import numpy as np


def grouped_order(modality_lengths: np.ndarray, global_batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """ceil(n / global_batch) global batches (index arrays; only the last may be short), length-grouped."""
    batches, leftovers = [], []
    for idx in (np.flatnonzero(modality_lengths > 0), np.flatnonzero(modality_lengths < 0)):
        if not len(idx):
            continue
        lengths = np.abs(modality_lengths[idx])
        perm = rng.permutation(len(idx))
        mult = int(min(max(len(idx) // (4 * global_batch), 1), 50))
        mega = global_batch * mult
        order = np.concatenate([
            perm[s : s + mega][np.argsort(-lengths[perm[s : s + mega]], kind="stable")] for s in range(0, len(perm), mega)
        ])
        chunks = [idx[order[s : s + global_batch]] for s in range(0, len(order), global_batch)]
        if len(chunks[-1]) < global_batch:
            leftovers.append(chunks.pop())
        batches += chunks
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if leftovers:  # the two short tails go last, re-split so no batch exceeds global_batch
        rest = np.concatenate(leftovers)
        batches += [rest[s : s + global_batch] for s in range(0, len(rest), global_batch)]
    return batches


def random_order(n: int, global_batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Global batches of a plain shuffle."""
    perm = rng.permutation(n)
    return [perm[s : s + global_batch] for s in range(0, n, global_batch)]


class BatchSampler:
    """Yields this rank's index lists for one epoch; `state_dict` records where a run stopped."""

    def __init__(self, modality_lengths, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 group_by_length: bool = True, accumulative_counts: int = 1):
        self.modality_lengths = np.asarray(modality_lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_by_length, self.accumulative_counts = seed, group_by_length, accumulative_counts
        self.step_batch = batch_size * world_size * accumulative_counts  # G: samples per optimizer step
        self.epoch, self.start = 0, 0  # start = micro-batches of this epoch already consumed (set on resume)

    def step_batches(self) -> list[np.ndarray]:
        """The epoch's optimizer-step batches of G indices, the last padded by wrapping around the dataset:
        a function of (seed, epoch, G) only."""
        g, n = self.step_batch, len(self.modality_lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = grouped_order(self.modality_lengths, g, rng) if self.group_by_length else random_order(n, g, rng)
        return [b if len(b) == g else np.concatenate([b, np.arange(g - len(b)) % n]) for b in batches]

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's micro global batches (world_size x batch_size indices): each step batch cut in
        accumulative_counts consecutive slices, so a micro-batch holds samples of similar length."""
        w = self.batch_size * self.world_size
        return [b[s : s + w] for b in self.step_batches() for s in range(0, len(b), w)]

    def steps_per_epoch(self) -> int:
        return -(-len(self.modality_lengths) // self.step_batch)

    def __len__(self) -> int:
        """Micro-batches per epoch (on every rank)."""
        return self.steps_per_epoch() * self.accumulative_counts

    def __iter__(self):
        for batch in self.global_batches()[self.start :]:
            yield batch[self.rank :: self.world_size].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Begin `epoch` from its first batch."""
        self.epoch, self.start = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = state["epoch"], state["start"]


def pack_by_length(lengths: np.ndarray, capacity: int, rng: np.random.Generator, pool: int = 10_000) -> list[np.ndarray]:
    """Packs of whole samples (index arrays) whose `lengths` sum to <= `capacity` tokens.

    The samples are shuffled and cut into pools of `pool`; each pool is packed best-fit decreasing (longest
    first, each into the fullest pack it still fits). On LLaVA-665K-like lengths (mean ~850 tokens, 576 of them
    the image) this fills 8192-token packs to ~0.99 and 16384-token packs to ~0.999 (scripts/bench/bench_packing.py).
    A pool mixes image and text-only samples: packing needs no modality grouping.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"{int((lengths > capacity).sum())} samples are longer than the {capacity}-token pack capacity")
    perm = rng.permutation(len(lengths))
    packs = []
    for s in range(0, len(perm), pool):
        idx = perm[s : s + pool]
        packs += [idx[p] for p in _best_fit_decreasing(lengths[idx].tolist(), capacity)]
    return packs


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions in `lengths` grouped into bins of <= capacity; `free` is kept sorted (bisect) with `owner`."""
    free, owner, bins = [], [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        need = lengths[i]
        k = bisect.bisect_left(free, need)  # the fullest bin that still fits
        if k == len(free):
            bins.append([i])
            left, b = capacity - need, len(bins) - 1
        else:
            left, b = free.pop(k) - need, owner.pop(k)
            bins[b].append(i)
        k = bisect.bisect_left(free, left)
        free.insert(k, left)
        owner.insert(k, b)
    return bins


class PackedBatchSampler:
    """Token-budget micro-batches: yields this rank's indices of one pack per step (`collate_packed` makes
    them one sequence); same interface as BatchSampler (set_epoch, state_dict, step_batch, steps_per_epoch, len).

    The packs are made once from `seed` (pack_by_length over |modality_lengths|, which count each image as
    the tokens it expands to); every epoch shuffles their order with (seed, epoch). Global batch g holds
    world_size packs and rank r takes pack g[r]; the pack list is padded by repeating its first packs to a
    multiple of G = world_size x accumulative_counts, so every rank runs the same number of steps and a step's
    packs do not depend on how G splits into ranks. A sample replaced at load time (unreadable image) may make
    its pack slightly longer than `max_tokens`.
    """

    def __init__(self, modality_lengths, max_tokens: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 pool: int = 10_000, accumulative_counts: int = 1):
        self.lengths = np.abs(np.asarray(modality_lengths, dtype=np.int64))
        self.max_tokens, self.world_size, self.rank, self.seed = max_tokens, world_size, rank, seed
        self.accumulative_counts = accumulative_counts
        self.step_batch = world_size * accumulative_counts  # G: packs per optimizer step
        self.packs = pack_by_length(self.lengths, max_tokens, np.random.default_rng([seed, 1 << 20]), pool)
        n = len(self.packs)
        self.packs += [self.packs[i % n] for i in range(-n % self.step_batch)]
        self.epoch, self.start = 0, 0

    def global_batches(self) -> list[list[np.ndarray]]:
        """The epoch's global batches: lists of world_size packs."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.packs))
        w = self.world_size
        return [[self.packs[i] for i in order[s : s + w]] for s in range(0, len(order), w)]

    def fill(self) -> float:
        """Tokens in the packs / (packs x max_tokens): how much of the budget the packs use."""
        return float(sum(self.lengths[p].sum() for p in self.packs) / (len(self.packs) * self.max_tokens))

    def steps_per_epoch(self) -> int:
        return len(self.packs) // self.step_batch

    def __len__(self) -> int:
        """Micro-batches per epoch (on every rank)."""
        return len(self.packs) // self.world_size

    def __iter__(self):
        for batch in self.global_batches()[self.start :]:
            yield batch[self.rank].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Begin `epoch` from its first batch."""
        self.epoch, self.start = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = state["epoch"], state["start"]
