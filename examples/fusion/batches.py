"""FusionNet training batches: natural-resolution samples of a GroupedStore, flipped reproducibly.

A batch comes from one shape group (``BucketBatchSampler``), so a 16x16 grid is never padded to
the largest grid. Augmentation mirrors a sample left-right and/or up-down with
``encoding.flip_sample``; the two coin flips of sample ``i`` in epoch ``e`` are a pure function
of ``(seed, e, i)``, so a resumed run sees exactly the batches of an uninterrupted one, whatever
the number of DataLoader workers. The 9-channel encoding and the legal-anchor mask are built on
the training device (:func:`model_inputs`), not in the loader.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from blockyard.data import GroupedStore

from .encoding import encode, flip_sample, legal_anchor_mask
from .grid import ZONE_PATTERNS

__all__ = ["Batch", "FusionSamples", "ModelInputs", "collate", "model_inputs"]


class Batch(NamedTuple):
    """One batch of stored samples (CPU tensors until :meth:`to`).

    - state: ``(B, 4, H, W)`` stored channels (float16); zero padding when ``pad_mask`` is set
    - target: ``(B, 3)`` int64 ``(y, x, action)``
    - history: ``(B, 32, 5)`` float32; history_len, initial_crossings: ``(B,)`` int64
    - pattern: ``(B,)`` int64 index into ``grid.ZONE_PATTERNS`` (``len`` for an unknown name)
    - pad_mask: ``(B, H, W)`` bool, True = padding, or None at natural resolution
    """

    state: torch.Tensor
    target: torch.Tensor
    history: torch.Tensor
    history_len: torch.Tensor
    initial_crossings: torch.Tensor
    pattern: torch.Tensor
    pad_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self))


class FusionSamples(Dataset):
    """Samples of one split; ``__getitems__`` returns a collated :class:`Batch` of one group.

    Args:
        store: the split's :class:`GroupedStore`.
        augment: random left-right / up-down mirroring (train split).
        seed: base seed of the flips; epoch ``e`` draws them from ``default_rng([seed, e])``.
        pad_to: pad every grid to ``pad_to x pad_to`` (the seed's layout, for the benchmark);
            None keeps the natural resolution.
    """

    def __init__(self, store: GroupedStore, *, augment: bool = False, seed: int = 0, pad_to: int | None = None) -> None:
        self.store, self.augment, self.seed, self.pad_to = store, augment, seed, pad_to
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's flips (call before the epoch's DataLoader iterator is created)."""
        self.epoch = int(epoch)
        if self.augment:
            self.flips = np.random.default_rng([self.seed, self.epoch]).random((len(self.store), 2)) < 0.5
        else:
            self.flips = np.zeros((len(self.store), 2), dtype=bool)

    @property
    def group_ids(self) -> np.ndarray:
        return self.store.group_ids

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        raw = self.store.get_batch(idx)
        state, target, history = raw["state"].numpy(), raw["target"].numpy(), raw["history"].numpy()
        history_len = raw["history_len"].numpy()
        flips = self.flips[idx]
        if flips.any():
            state, target, history = state.copy(), target.copy(), history.copy()
            for j in np.flatnonzero(flips.any(1)):
                state[j], target[j], history[j] = flip_sample(state[j], target[j], history[j], int(history_len[j]),
                                                              bool(flips[j, 0]), bool(flips[j, 1]))
        pattern = torch.tensor([ZONE_PATTERNS.index(p) if p in ZONE_PATTERNS else len(ZONE_PATTERNS)
                                for p in raw["zone_pattern"]])
        state = torch.from_numpy(np.ascontiguousarray(state))
        pad_mask = None
        if self.pad_to is not None:
            h, w = state.shape[-2:]
            if h > self.pad_to or w > self.pad_to:
                raise ValueError(f"pad_to: expected >= the grid ({h}, {w}), got {self.pad_to}")
            state = torch.nn.functional.pad(state, (0, self.pad_to - w, 0, self.pad_to - h))
            pad_mask = torch.ones(len(idx), self.pad_to, self.pad_to, dtype=torch.bool)
            pad_mask[:, :h, :w] = False
        return Batch(state, torch.from_numpy(np.ascontiguousarray(target)), torch.from_numpy(history),
                     raw["history_len"], raw["initial_crossings"], pattern, pad_mask)


def collate(batch: Batch) -> Batch:
    """``DataLoader`` collate function: ``__getitems__`` already returns a whole batch."""
    return batch


class ModelInputs(NamedTuple):
    """``x (B, 9, H, W)``, ``mask (B, H, W)`` (True = not a legal anchor), ``centers (B, 2)``."""

    x: torch.Tensor
    mask: torch.Tensor
    centers: torch.Tensor


def model_inputs(batch: Batch, channels_last: bool = False) -> ModelInputs:
    """Encode a batch on its device: the 9 input channels and the legal-anchor mask."""
    x = encode(batch.state, batch.initial_crossings, batch.pad_mask)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return ModelInputs(x, legal_anchor_mask(batch.state, batch.pad_mask), batch.target[:, :2])
