"""Bucket-aware, sharded, resumable batch order, computed as a pure function of (seed, epoch, cursor).

Resuming needs only the cursor (micro-batches this rank has consumed): no sampler state is saved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator, Sequence

import torch

_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs do not collide for realistic epochs
_SEED_MOD = 2**63  # torch.Generator.manual_seed accepts at most 64-bit values


class BucketBatchSampler:
    """Batches of sample indices that all share one bucket, sharded over `world_size` ranks."""

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        """`buckets[i]` is the bucket key of sample i (e.g. its (width, height))."""
        if len(buckets) == 0:
            raise ValueError("buckets must list at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # Batches per bucket depend only on bucket sizes, never on the permutation.
        global_batches = sum(-(-count // batch_size) for count in Counter(self.buckets).values())
        self._batches_per_epoch = -(-global_batches // world_size)
        self._cached_epoch: int | None = None
        self._cached_batches: list[list[int]] = []

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank takes per epoch; the same for every epoch and every rank."""
        return self._batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batch list of `epoch` (all ranks), padded to a multiple of world_size.

        Indices are permuted, grouped by bucket in permuted order, cut into batches (the last of a
        bucket may be smaller; nothing is dropped), and the batches are shuffled. Padding repeats
        batches from the start of the list.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        generator = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) % _SEED_MOD)
        groups: dict[Hashable, list[int]] = {}
        for index in torch.randperm(len(self.buckets), generator=generator).tolist():
            groups.setdefault(self.buckets[index], []).append(index)
        batches = [
            group[start : start + self.batch_size]
            for group in groups.values()
            for start in range(0, len(group), self.batch_size)
        ]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        # Pad so every rank takes the same number of steps (cycling when batches < world_size).
        padded_len = self._batches_per_epoch * self.world_size
        return batches + [batches[i % len(batches)] for i in range(padded_len - len(batches))]

    def batch_at(self, cursor: int) -> list[int]:
        """This rank's batch for its `cursor`-th micro-batch since the start of training."""
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        epoch, i = divmod(cursor, self._batches_per_epoch)
        if epoch != self._cached_epoch:
            self._cached_batches = self.epoch_batches(epoch)
            self._cached_epoch = epoch
        return list(self._cached_batches[i * self.world_size + self.rank])

    def iter_from(self, cursor: int, stride: int = 1) -> Iterator[list[int]]:
        """Endless batches at cursor, cursor + stride, ...; usable once as a DataLoader `batch_sampler`.
        With world_size 1 and stride P, rank r starting at cursor + r takes every P-th batch of the one
        global order: the order does not depend on the number of processes."""
        while True:
            yield self.batch_at(cursor)
            cursor += stride
