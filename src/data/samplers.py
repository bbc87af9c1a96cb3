"""Batch sampler that never mixes shape groups and shards whole batches across DDP ranks."""
from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "rank_batches"]


def _check_int(name: str, value: Any) -> None:
    # a float batch size would fail later inside range() with a message that names no argument
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")


def _group_codes(groups: Any) -> np.ndarray:
    if hasattr(groups, "group_ids"):  # a GroupedStore or a PaddedDataset
        groups = groups.group_ids
    arr = np.asarray(groups)
    if arr.ndim == 1 and arr.dtype.kind in "iub":
        return np.unique(arr, return_inverse=True)[1].astype(np.int64)
    codes: dict[Hashable, int] = {}
    return np.array([codes.setdefault(g, len(codes)) for g in groups], dtype=np.int64)


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of indices from one group each, the same number of batches on every rank.

    Per epoch (the same on every rank, from ``seed`` and the epoch set by :meth:`set_epoch`):
    the indices of each group are shuffled and cut into batches of ``batch_size`` (the last
    batch of a group may be smaller, or is dropped with ``drop_last=True``); the batches of all
    groups are shuffled together; rank ``r`` takes batches ``r, r + world_size, ...``.

    Equal length per rank, so DDP never waits on a rank that ran out: when the number of
    batches ``B`` is not a multiple of ``world_size``,

    - ``drop_last=False``: the list is padded by repeating its first batches (the epoch's
      shuffle decides which) until it is; those samples are seen twice that epoch. When no
      padding is needed every index appears exactly once across all ranks;
    - ``drop_last=True``: the last ``B % world_size`` batches of the shuffled list are dropped
      (different ones every epoch), on top of each group's incomplete batch.

    Batch sizes can differ between ranks on the same step (a group's short last batch);
    DDP's gradient averaging handles that.

    Args:
        groups: the group of every index (ints, strings, tuples...) or an object with a
            ``group_ids`` attribute (:class:`GroupedStore`, :class:`PaddedDataset`).
        batch_size: maximum samples per batch.
        shuffle: shuffle within groups and the batch order; False keeps index order and
            group-by-group batch order.
        seed: base seed; the epoch's permutation depends only on ``(seed, epoch)``.
        drop_last: drop incomplete batches (see above).
        rank, world_size: this process's shard.
    """

    def __init__(self, groups: Sequence[Hashable] | Any, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        for name, value in (("batch_size", batch_size), ("rank", rank), ("world_size", world_size)):
            _check_int(name, value)
        batch_size, rank, world_size = int(batch_size), int(rank), int(world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        codes = _group_codes(groups)
        order = np.argsort(codes, kind="stable")
        splits = np.flatnonzero(np.diff(codes[order])) + 1
        self.members = np.split(order, splits) if codes.size else []
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (call with the same value on every rank)."""
        self.epoch = int(epoch)

    def _num_batches(self) -> int:
        bs = self.batch_size
        return sum(len(m) // bs if self.drop_last else -(-len(m) // bs) for m in self.members)

    def __len__(self) -> int:
        total = self._num_batches()
        return total // self.world_size if self.drop_last else -(-total // self.world_size)

    def _all_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for members in self.members:
            if self.shuffle:
                members = members[rng.permutation(len(members))]
            stop = len(members) - len(members) % self.batch_size if self.drop_last else len(members)
            batches.extend(members[i:i + self.batch_size] for i in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(self)
        need = per_rank * self.world_size
        if need <= len(batches):
            return batches[:need]
        return [batches[i % len(batches)] for i in range(need)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._all_batches()[self.rank::self.world_size]:
            yield batch.tolist()


def rank_batches(num_samples: int, batch_size: int, epoch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> torch.Tensor:
    """This rank's batches of one shuffled epoch over an in-memory dataset, as an index tensor.

    All ranks draw the same permutation, seeded by ``seed * 1000 + epoch`` (so the order survives a resume
    and needs no communication), cut it into ``steps`` global batches of ``world_size *
    batch_size`` rows (the remainder is dropped, so every rank takes the same number of steps),
    and rank ``r`` takes the ``r``-th slice of every global batch: ranks never share a row.

    Args:
        num_samples: rows in the dataset.
        batch_size: rows per batch per rank.
        epoch: the epoch, part of the seed.
        seed: the run's seed.
        rank, world_size: this process and the number of processes.

    Shapes:
        - output: ``(steps, batch_size)`` int64 with ``steps = num_samples // (world_size * batch_size)``
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("epoch", epoch),
                        ("seed", seed), ("rank", rank), ("world_size", world_size)):
        _check_int(name, value)
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size, rank, world_size: expected >= 1 and 0 <= rank < world_size, got "
                         f"{batch_size}, {rank}, {world_size}")
    steps = num_samples // (world_size * batch_size)
    if steps < 1:
        raise ValueError(f"batch_size: {world_size} ranks x {batch_size} rows is more than the "
                         f"{num_samples} samples")
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(num_samples, generator=gen)[: steps * world_size * batch_size]
    return order.view(steps, world_size, batch_size)[:, rank]
