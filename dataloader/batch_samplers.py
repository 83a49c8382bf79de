"""Which videos form each batch: balanced N classes × M videos (paper §4.1) or sharded plain batches.

What is read of each of those videos is ``clip_plan``'s decision.

Both yield lists of annotation rows, are deterministic per (seed, epoch) through
``set_epoch``, and shard by rank without padding: every rank draws the same epoch-wide plan
from ``np.random.default_rng([seed, epoch])`` and keeps its own share of it.
"""
from __future__ import annotations

import math

import numpy as np

from ccs_fast.base.errors import bad_file


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class BalancedBatchSampler:
    """Batches of ``classes_per_batch`` (N) distinct classes × ``videos_per_class`` (M).

    Each class's videos are shuffled and cut into groups of M; a batch draws N distinct
    classes with probability proportional to their groups left and takes one group of each,
    so an epoch is close to one pass over the videos and repeats a video only when its class
    runs out (it is then reshuffled). A class with fewer than M videos fills its M slots by
    sampling with replacement.
    An epoch has ``num_videos // (N·M·world_size)`` batches per rank (rounded up when
    ``drop_last`` is False, at least one); rank r keeps batches r, r + world_size, … of the
    epoch's plan, so ranks get disjoint batches and the same number of them.
    """

    def __init__(self, labels, classes_per_batch, videos_per_class, seed=0, rank=0,
                 world_size=1, drop_last=True):
        labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.unique(labels)
        if classes_per_batch > len(self.classes):
            raise ValueError(f"classes_per_batch={classes_per_batch} but the videos "
                             f"have only {len(self.classes)} classes")
        if classes_per_batch < 1 or videos_per_class < 1:
            raise ValueError("classes_per_batch and videos_per_class must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.videos_of_class = [np.flatnonzero(labels == c) for c in self.classes]
        self.num_videos = len(labels)
        self.classes_per_batch = classes_per_batch
        self.videos_per_class = videos_per_class
        self.batch_size = classes_per_batch * videos_per_class
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = self.num_videos / (self.batch_size * self.world_size)
        return max(1, math.floor(per_rank) if self.drop_last else math.ceil(per_rank))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The whole epoch's plan over all ranks (len(self) · world_size batches)."""
        rng = epoch_rng(self.seed, epoch)
        chunks = [self._chunks(c, rng) for c in range(len(self.classes))]
        batches = []
        for _ in range(len(self) * self.world_size):
            left = np.array([len(c) for c in chunks], dtype=np.float64)
            if np.count_nonzero(left) < self.classes_per_batch:
                for c in np.flatnonzero(left == 0):
                    chunks[c] = self._chunks(c, rng)
                left = np.array([len(c) for c in chunks], dtype=np.float64)
            picked = rng.choice(len(chunks), self.classes_per_batch, replace=False,
                                p=left / left.sum())
            batches.append([v for c in picked for v in chunks[c].pop()])
        return batches

    def _chunks(self, c, rng) -> list[list[int]]:
        """One shuffled pass over class c cut into groups of M (remainder left for the next
        pass), or a single group drawn with replacement when the class has fewer than M."""
        m, videos = self.videos_per_class, self.videos_of_class[c]
        if len(videos) < m:
            return [[int(v) for v in rng.choice(videos, m, replace=True)]]
        order = rng.permutation(videos)
        return [[int(v) for v in order[i:i + m]] for i in range(0, len(order) - m + 1, m)]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.rank::self.world_size]


class ShardedSampler:
    """Plain batches of ``batch_size`` rows, sharded by rank.

    shuffle=True (training): a per-(seed, epoch) permutation cut to ``num_items //
    world_size`` rows per rank (the remainder sits out this epoch), partial batch dropped when
    ``drop_last``. shuffle=False (evaluation): rows in order, rank r a contiguous share, every
    row exactly once over the ranks, no padding; with drop_last False the last partial batch
    is kept, so ranks may differ by one batch.
    """

    def __init__(self, num_items, batch_size, *, shuffle, seed=0, rank=0, world_size=1,
                 drop_last=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = shuffle if drop_last is None else drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_indices(self) -> np.ndarray:
        if self.shuffle:
            per_rank = self.num_items // self.world_size
            order = epoch_rng(self.seed, self.epoch).permutation(self.num_items)
            return order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return np.array_split(np.arange(self.num_items), self.world_size)[self.rank]

    def __len__(self) -> int:
        n = len(self.rank_indices()) if not self.shuffle else self.num_items // self.world_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        indices = self.rank_indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield [int(i) for i in indices[start:start + self.batch_size]]


def batch_sampler_for(spec, labels):
    """The batch sampler of a ``LoaderSpec`` over videos with these labels: balanced N × M
    batches when training with classes_per_batch = N, plain sharded batches otherwise."""
    if spec.train and spec.classes_per_batch:
        n = spec.classes_per_batch
        if spec.batch_size % n:
            raise ValueError(f"batch_size {spec.batch_size} is not a multiple of "
                             f"classes_per_batch {n}")
        try:
            return BalancedBatchSampler(labels, n, spec.batch_size // n, seed=spec.seed,
                                        rank=spec.rank, world_size=spec.world_size)
        except ValueError as exc:
            raise bad_file(spec.annotation, str(exc)) from None
    return ShardedSampler(len(labels), spec.batch_size, shuffle=spec.train, seed=spec.seed,
                          rank=spec.rank, world_size=spec.world_size, drop_last=spec.train)
