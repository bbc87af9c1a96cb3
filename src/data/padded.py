"""Dataset view of a GroupedStore that pads spatial fields on the fly and reports the padding."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import GroupedStore

__all__ = ["PAD_MASK", "PaddedDataset"]

PAD_MASK = "pad_mask"


class PaddedDataset(Dataset):
    """Samples of a :class:`GroupedStore`, spatial fields zero-padded to ``size``, plus a pad mask.

    Padding goes at the bottom and right, so the natural grid stays at the top-left and every
    ``(y, x)`` coordinate stored in a sample stays valid. The returned ``"pad_mask"`` is a bool
    ``(H, W)`` map where **True means masked** (a padding cell, outside the grid; the blockyard
    mask convention), False inside the natural grid. A model that wants a grid-validity input
    channel (1 inside the grid) uses ``(~pad_mask).float()``.

    ``transform`` (e.g. a flip augmentation) is called on the sample at its natural resolution,
    before padding: flipping a padded sample would move the grid away from the top-left corner
    and shift coordinates by the padding width. It receives and returns a dict.

    With ``size=None`` nothing is padded and ``pad_mask`` is all False: natural-resolution
    samples, which :class:`BucketBatchSampler` batches without mixing shapes (pass the dataset
    itself as its ``groups``: ``group_ids`` gives each item's group). ``DataLoader`` fetches a
    whole batch through ``__getitems__``: one gather per field from the memory map and, without
    a transform, one padding op per batch.

    Args:
        store: the :class:`GroupedStore` to read.
        size: target ``(H, W)`` (an int means square); None keeps the natural resolution. A
            sample larger than ``size`` raises ``ValueError`` (never cropped).
        transform: optional ``sample -> sample`` applied before padding.
        fields: fields to pad (their last two dims); default ``store.spatial_fields``.
        indices: optional global store indices this dataset exposes, in order (repeats allowed,
            e.g. the output of :func:`balanced_indices`); default every sample.

    Shapes:
        - padded field: ``(*lead, h, w)`` in the store -> ``(*lead, H, W)``, same dtype
        - ``pad_mask``: ``(H, W)`` bool (``(h, w)`` all False with ``size=None``)
        - other fields: unchanged
    """

    def __init__(self, store: GroupedStore, size: int | Sequence[int] | None = None,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 fields: Sequence[str] | None = None, indices: Sequence[int] | np.ndarray | None = None) -> None:
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size: expected an int or (H, W) of positive ints, got {size}")
        self.store = store
        self.size: tuple[int, int] | None = size
        self.transform = transform
        self.fields = tuple(store.spatial_fields if fields is None else fields)
        unknown = [f for f in self.fields if f not in store.fields or store.fields[f] == "str"]
        if unknown:
            raise ValueError(f"fields: {unknown} are not array fields of the store {sorted(store.fields)}")
        if PAD_MASK in store.fields:
            raise ValueError(f"store: field name {PAD_MASK!r} is reserved for the pad mask")
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
        idx = self.indices
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(store))):
            raise ValueError(f"indices: expected a 1-D sequence in [0, {len(store)}), got shape {self.indices.shape}")
        if size is not None and transform is None:
            for group in store.groups:  # fail early instead of deep inside a DataLoader worker
                for f in self.fields:
                    h, w = group.shapes[f][-2:]
                    if h > size[0] or w > size[1]:
                        raise ValueError(f"size: expected at least ({h}, {w}) for field {f!r}, got {size}")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def group_ids(self) -> np.ndarray:
        """``(len(self),)`` group number of every item, for :class:`BucketBatchSampler`."""
        return self.store.group_ids[self.indices]

    def _finish(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.transform is not None:
            sample = self.transform(sample)
        natural = {tuple(sample[f].shape[-2:]) for f in self.fields}
        if len(natural) > 1:
            raise ValueError(f"fields: expected one spatial shape across {self.fields}, got {sorted(natural)}")
        h, w = natural.pop() if natural else (0, 0)
        H, W = (h, w) if self.size is None else self.size
        if h > H or w > W:
            raise ValueError(f"size: expected at least ({h}, {w}), got {self.size}")
        for f in self.fields:
            x = sample[f]
            if (h, w) != (H, W):
                out = x.new_zeros(*x.shape[:-2], H, W)
                out[..., :h, :w] = x
                sample[f] = out
        mask = torch.ones(H, W, dtype=torch.bool)
        mask[:h, :w] = False
        sample[PAD_MASK] = mask
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._finish(self.store[int(self.indices[i])])

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]]:
        """Batched fetch used by ``DataLoader``: one gather per field when all items share a group."""
        idx = self.indices[np.asarray(items, dtype=np.int64)]
        groups = self.store.group_of(idx)
        if len(idx) == 0 or np.any(groups != groups[0]):
            return [self[i] for i in items]
        batch = self.store.get_batch(idx)
        if self.transform is not None:
            return [self._finish({k: v[j] for k, v in batch.items()}) for j in range(len(idx))]
        # No transform: every item has the group's shape, so pad the whole batch at once.
        first = self._finish({k: v[0] for k, v in batch.items()})
        for f in self.fields:
            x = batch[f]
            h, w = x.shape[-2:]
            H, W = first[f].shape[-2:]
            if (h, w) != (H, W):
                batch[f] = x.new_zeros(*x.shape[:-2], H, W)
                batch[f][..., :h, :w] = x
        mask = first[PAD_MASK]
        return [{**{k: v[j] for k, v in batch.items()}, PAD_MASK: mask} for j in range(len(idx))]
