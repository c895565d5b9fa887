"""Which samples each rank reads at each step: a pure function of (seed, position), so a run resumes exactly.

The dataset's samples come in batches of ``batch_size`` consecutive indices (the data package gives
the samples of one batch one resolution). An epoch is a permutation of those batches, drawn from
(seed, epoch). The stream of micro-batches is numbered by a global position p = 0, 1, 2, ...:
position p is batch ``perm_epoch[p mod batches]`` of epoch ``p // batches``; micro-step a of step s on
rank r reads position (s * grad_accum + a) * world_size + r. Nothing depends on workers or on what was
read before, so resuming at step s reads exactly what the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class SampleOrder:
    def __init__(self, dataset_len: int, batch_size: int, seed: int, shuffle: bool = True):
        if dataset_len < batch_size:
            raise ValueError(f"the training data has {dataset_len} samples, fewer than batch_size={batch_size}: add "
                             "data (or scenes) or lower batch_size")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.batches = dataset_len // batch_size  # a trailing partial batch is left out, as drop_last does
        self._epoch, self._perm = -1, None

    def indices(self, position: int) -> list[int]:
        """The dataset indices of micro-batch ``position``."""
        epoch, within = divmod(position, self.batches)
        batch = self._permutation(epoch)[within] if self.shuffle else within
        return list(range(batch * self.batch_size, (batch + 1) * self.batch_size))

    def slots(self, position: int) -> list[int]:
        """Global numbers of the samples of micro-batch ``position`` in the stream (seeds per-sample draws)."""
        return [position * self.batch_size + b for b in range(self.batch_size)]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.batches, generator=generator).tolist()
        return self._perm


def position(step: int, micro_step: int, grad_accum: int, rank: int, world_size: int) -> int:
    return (step * grad_accum + micro_step) * world_size + rank


class RankSampler(Sampler[list[int]]):
    """An endless batch sampler for a DataLoader: this rank's micro-batches from ``start_step`` on."""

    def __init__(self, order: SampleOrder, *, start_step: int, grad_accum: int, rank: int, world_size: int):
        self.order, self.start_step, self.grad_accum = order, start_step, grad_accum
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.order.indices(position(step, micro, self.grad_accum, self.rank, self.world_size))
            step += 1
