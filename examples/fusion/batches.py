"""FusionNet training batches: natural-resolution samples of a GroupedStore, flipped and perturbed reproducibly.

A batch comes from one shape group (``BucketBatchSampler``), so a 16x16 grid is never padded to
the largest grid. Augmentation mirrors a sample left-right and/or up-down with
``encoding.flip_sample`` (its op set with ``encoding.flip_ops``); then, with probability
``perturb``, ``perturb_steps`` random applicable ops move the state off the teacher's trajectory
and the environment relabels it (``perturb.perturb_state``: the new op set, and a uniformly drawn
improving op as the teacher-pick target; the history stays the stored one). Every draw for
sample ``i`` in epoch ``e`` is a pure function of ``(seed, e, i)``, so a resumed run sees exactly
the batches of an uninterrupted one, whatever the number of DataLoader workers. The 9-channel
encoding and the legal-anchor mask are built on the training device (:func:`model_inputs`), not
in the loader.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from blockyard.data import GroupedStore

from .encoding import OpMaps, encode, flip_ops, flip_sample, legal_anchor_mask, op_maps
from .grid import ZONE_PATTERNS
from .perturb import perturb_state

__all__ = ["Batch", "FusionSamples", "ModelInputs", "collate", "model_inputs"]


class Batch(NamedTuple):
    """One batch of stored samples (CPU tensors until :meth:`to`).

    - state: ``(B, 4, H, W)`` stored channels (float16); zero padding when ``pad_mask`` is set
    - target: ``(B, 3)`` int64 ``(y, x, action)``, the teacher's pick
    - ops: ``(B, 3, H, W)`` uint8 op set of each state (``encoding.encode_ops``; decoded on the
      device by ``encoding.op_maps``), zero padded
    - history: ``(B, 32, 5)`` float32; history_len, initial_crossings: ``(B,)`` int64
    - pattern: ``(B,)`` int64 index into ``grid.ZONE_PATTERNS`` (``len`` for an unknown name)
    - perturbed: ``(B,)`` bool, the state was perturbed (and relabelled) this epoch
    - pad_mask: ``(B, H, W)`` bool, True = padding, or None at natural resolution
    """

    state: torch.Tensor
    target: torch.Tensor
    ops: torch.Tensor
    history: torch.Tensor
    history_len: torch.Tensor
    initial_crossings: torch.Tensor
    pattern: torch.Tensor
    perturbed: torch.Tensor
    pad_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self))


class FusionSamples(Dataset):
    """Samples of one split; ``__getitems__`` returns a collated :class:`Batch` of one group.

    Args:
        store: the split's :class:`GroupedStore`.
        augment: random left-right / up-down mirroring (train split).
        seed: base seed of the flips and perturbations; epoch ``e`` draws the flips from
            ``default_rng([seed, e])``, which samples to perturb from ``default_rng([seed, e, 1])``
            and sample ``i``'s perturbation from ``default_rng([seed, e, i, 2])``.
        pad_to: pad every grid to ``pad_to x pad_to`` (the seed's layout, for the benchmark);
            None keeps the natural resolution.
        perturb: probability that a sample is perturbed in an epoch (0 = never).
        perturb_steps: random ops applied to a perturbed sample.
    """

    def __init__(self, store: GroupedStore, *, augment: bool = False, seed: int = 0, pad_to: int | None = None,
                 perturb: float = 0.0, perturb_steps: int = 2) -> None:
        if not 0.0 <= perturb <= 1.0:
            raise ValueError(f"perturb: expected a probability in [0, 1], got {perturb}")
        if perturb > 0 and perturb_steps < 1:
            raise ValueError(f"perturb_steps: expected >= 1, got {perturb_steps}")
        if "ops" not in store.fields:
            raise ValueError(f"store: expected the field 'ops' (every sample's op set), which {store!r} lacks: it "
                             f"was built by an earlier build_data.py; rebuild it (build_data.py --force)")
        self.store, self.augment, self.seed, self.pad_to = store, augment, seed, pad_to
        self.perturb, self.perturb_steps = float(perturb), int(perturb_steps)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's flips and perturbed samples (call before the epoch's DataLoader iterator is created)."""
        self.epoch = int(epoch)
        n = len(self.store)
        if self.augment:
            self.flips = np.random.default_rng([self.seed, self.epoch]).random((n, 2)) < 0.5
        else:
            self.flips = np.zeros((n, 2), dtype=bool)
        if self.perturb > 0:
            self.perturbed = np.random.default_rng([self.seed, self.epoch, 1]).random(n) < self.perturb
        else:
            self.perturbed = np.zeros(n, dtype=bool)

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
        ops, history_len = raw["ops"].numpy(), raw["history_len"].numpy()
        flips, chosen = self.flips[idx], self.perturbed[idx]
        if flips.any() or chosen.any():
            state, target, history, ops = state.copy(), target.copy(), history.copy(), ops.copy()
        for j in np.flatnonzero(flips.any(1)):
            fx, fy = bool(flips[j, 0]), bool(flips[j, 1])
            state[j], target[j], history[j] = flip_sample(state[j], target[j], history[j], int(history_len[j]), fx, fy)
            ops[j] = flip_ops(ops[j], fx, fy)
        perturbed = np.zeros(len(idx), dtype=bool)
        for j in np.flatnonzero(chosen):
            rng = np.random.default_rng([self.seed, self.epoch, int(idx[j]), 2])
            moved = perturb_state(state[j], self.perturb_steps, rng)
            if moved is not None:  # else no improving op there: the stored sample stays
                state[j], ops[j], target[j], perturbed[j] = moved.state, moved.ops, moved.target, True
        pattern = torch.tensor([ZONE_PATTERNS.index(p) if p in ZONE_PATTERNS else len(ZONE_PATTERNS)
                                for p in raw["zone_pattern"]])
        state, ops = torch.from_numpy(np.ascontiguousarray(state)), torch.from_numpy(np.ascontiguousarray(ops))
        pad_mask = None
        if self.pad_to is not None:
            h, w = state.shape[-2:]
            if h > self.pad_to or w > self.pad_to:
                raise ValueError(f"pad_to: expected >= the grid ({h}, {w}), got {self.pad_to}")
            state = torch.nn.functional.pad(state, (0, self.pad_to - w, 0, self.pad_to - h))
            ops = torch.nn.functional.pad(ops, (0, self.pad_to - w, 0, self.pad_to - h))
            pad_mask = torch.ones(len(idx), self.pad_to, self.pad_to, dtype=torch.bool)
            pad_mask[:, :h, :w] = False
        return Batch(state, torch.from_numpy(np.ascontiguousarray(target)), ops, torch.from_numpy(history),
                     raw["history_len"], raw["initial_crossings"], pattern, torch.from_numpy(perturbed), pad_mask)


def collate(batch: Batch) -> Batch:
    """``DataLoader`` collate function: ``__getitems__`` already returns a whole batch."""
    return batch


class ModelInputs(NamedTuple):
    """``x (B, 9, H, W)``, ``mask (B, H, W)`` (True = not a legal anchor), ``centers (B, 2)`` (the
    teacher's pick), ``ops`` the decoded op sets (:class:`encoding.OpMaps`, ``(B, 12, H, W)``)."""

    x: torch.Tensor
    mask: torch.Tensor
    centers: torch.Tensor
    ops: OpMaps


def model_inputs(batch: Batch, channels_last: bool = False) -> ModelInputs:
    """Encode a batch on its device: the 9 input channels, the legal-anchor mask and the op sets."""
    x = encode(batch.state, batch.initial_crossings, batch.pad_mask)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return ModelInputs(x, legal_anchor_mask(batch.state, batch.pad_mask), batch.target[:, :2], op_maps(batch.ops))
