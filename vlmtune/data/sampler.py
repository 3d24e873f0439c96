"""Batch order: random or modality-aware length-grouped, split across ranks, resumable mid-epoch.

Every rank computes the same global order from (seed, epoch); global batch g holds world_size x batch_size
indices and rank r takes g[r::world_size], so ranks get disjoint samples of similar length. Grouping follows
XTuner's LengthGroupedSampler (mega-batches of up to 50 global batches sorted by length) and LLaVA's
modality split (image and text-only samples never share a batch, except in the leftover tail: the last one or
two batches, made of the short remainders of both modalities).
"""
from __future__ import annotations

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

    def __init__(self, modality_lengths, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, group_by_length: bool = True):
        self.modality_lengths = np.asarray(modality_lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.start = 0, 0  # start = batches of this epoch already consumed (set on resume)

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches, each padded (by wrapping around the dataset) to a full global batch
        so every rank runs the same number of steps."""
        g = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.modality_lengths)
        batches = grouped_order(self.modality_lengths, g, rng) if self.group_by_length else random_order(n, g, rng)
        return [b if len(b) == g else np.concatenate([b, np.arange(g - len(b)) % n]) for b in batches]

    def __len__(self) -> int:
        return -(-len(self.modality_lengths) // (self.batch_size * self.world_size))

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
