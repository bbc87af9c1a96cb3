"""Folder of safetensors shards: padded matrices with their true shapes, side parameters and targets.

The layout suits small variable-size matrices with a few side parameters (System A: k x (n-k)
generator matrices, k in 4..6, n-k in 3..6, side ``(n, k, m)``, target the m-height), stored
zero-padded at the bottom and right to one ``(Kmax, Nmax)`` so batches need no collate logic.
Shards are appended one at a time (e.g. one per generator job) by :func:`write_shard`.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._safetensors import CorruptedStoreError, array_to_torch, map_file, sha256_file
from .padded import PAD_MASK
from .shard_format import INDEX, MATRIX, RESERVED, SHAPE, SIDE, TARGET, pad_mask, read_index
from .shard_writer import write_shard

__all__ = ["ShardDataset", "write_shard"]


class ShardDataset(Dataset):
    """Read-only, lazily memory-mapped dataset over a folder of shards written by :func:`write_shard`.

    Global index ``i`` runs over the shards in ``index.json`` order, rows in order. Each item is
    a dict of tensors: ``matrix`` zero-padded to ``(Kmax, Nmax)`` (natural block at the top
    left), ``pad_mask`` (bool, **True means masked**: a padding cell outside the true shape;
    the blockyard convention), ``shape`` (the true ``(k, n)``), ``side``, ``target`` and any
    extras, dtypes as written. ``DataLoader`` batches go through :meth:`__getitems__` (one
    gather per field and shard); when per-item collation is the bottleneck, iterate a
    ``BatchSampler`` and call :meth:`get_batch`, which returns the stacked batch directly.

    Opening reads the index and checks that every shard exists with the listed size, and with
    ``verify=True`` its sha256 (streamed); ``verify="lazy"`` hashes a shard on its first read in
    each process instead (every DataLoader worker hashes the shards it touches); damaged or
    missing shards raise :class:`CorruptedStoreError` naming the file. Memory maps are opened
    on first access, at most ``max_open`` at a time (least recently used closed first), and
    dropped when the dataset is pickled, so each DataLoader worker re-opens its own.

    Args:
        folder: the dataset folder.
        verify: ``True`` (hash every shard on open), ``"lazy"`` (on first read) or ``False``.
        max_open: most shard files kept memory-mapped per process.

    Shapes:
        - matrix: ``(Kmax, Nmax)``; pad_mask: ``(Kmax, Nmax)`` bool; shape: ``(2,)`` int64
        - side: ``(side_dim,)``; target: ``()``; extras: their per-sample shape
        - :attr:`targets`: ``(N,)``; ``column(name)``: ``(N, *shape)``
    """

    def __init__(self, folder: str | os.PathLike, *, verify: bool | str = True, max_open: int = 64) -> None:
        if verify not in (True, False, "lazy"):
            raise ValueError(f"verify: expected True, False or 'lazy', got {verify!r}")
        if max_open < 1:
            raise ValueError(f"max_open: expected >= 1, got {max_open}")
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise FileNotFoundError(f"{self.folder}: not a ShardDataset (no {INDEX})")
        index = read_index(self.folder)
        self.fields: dict[str, str] = {k: f["dtype"] for k, f in index["fields"].items()}
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(f["shape"]) for k, f in index["fields"].items()}
        self.extras = tuple(k for k in self.fields if k not in RESERVED)
        self.shards: tuple[dict[str, Any], ...] = tuple(index["shards"])
        self._stops = np.cumsum([s["count"] for s in self.shards], dtype=np.int64)
        for shard in self.shards:
            file = self.folder / shard["file"]
            if not file.is_file():
                raise CorruptedStoreError(f"{file}: shard file is missing")
            if file.stat().st_size != shard["bytes"]:
                raise CorruptedStoreError(f"{file}: size {file.stat().st_size} bytes, index says {shard['bytes']}")
        self._verify = verify
        self._verified: set[int] = set()
        if verify is True:
            for s in range(len(self.shards)):
                self._check_hash(s)
        self.max_open = max_open
        self._maps: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def _check_hash(self, s: int) -> None:
        file = self.folder / self.shards[s]["file"]
        if sha256_file(file) != self.shards[s]["sha256"]:
            raise CorruptedStoreError(f"{file}: sha256 does not match the index; the shard is corrupted")
        self._verified.add(s)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()  # memory maps are per process; workers re-open lazily
        return state

    def __len__(self) -> int:
        return int(self._stops[-1]) if len(self._stops) else 0

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.folder)!r}, n={len(self)}, shards={len(self.shards)}, "
                f"matrix={self.shapes[MATRIX]}, side_dim={self.side_dim})")

    @property
    def max_shape(self) -> tuple[int, int]:
        """``(Kmax, Nmax)``, the padded matrix shape."""
        return self.shapes[MATRIX]  # type: ignore[return-value]

    @property
    def side_dim(self) -> int:
        return self.shapes[SIDE][0]

    def _arrays(self, s: int) -> dict[str, np.ndarray]:
        arrays = self._maps.get(s)
        if arrays is not None:
            self._maps.move_to_end(s)
            return arrays
        shard = self.shards[s]
        file = self.folder / shard["file"]
        if self._verify == "lazy" and s not in self._verified:
            self._check_hash(s)
        arrays, dtypes = map_file(file)
        for key, dtype in self.fields.items():
            if key not in arrays or arrays[key].shape != (shard["count"], *self.shapes[key]) or dtypes[key] != dtype:
                raise CorruptedStoreError(f"{file}: field {key!r} does not match the index")
        self._maps[s] = arrays
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return arrays

    def _check(self, index: Any) -> np.ndarray:
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"index: expected integers, got {idx.dtype}")
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index: out of range for a dataset of {n} samples")
        return np.where(idx < 0, idx + n, idx).astype(np.int64).reshape(-1)

    def shard_of(self, index: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Shard number of each global index, ``(len(index),)`` int64."""
        return np.searchsorted(self._stops, self._check(index), side="right")

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Samples stacked per field, in the given order (repeats allowed), with ``pad_mask``."""
        idx = self._check(indices)
        shard = np.searchsorted(self._stops, idx, side="right")
        starts = np.concatenate([[0], self._stops[:-1]])
        out = {k: torch.empty(len(idx), *self.shapes[k], dtype=getattr(torch, d)) for k, d in self.fields.items()}
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            arrays = self._arrays(int(s))
            local = idx[rows] - starts[s]
            where = torch.from_numpy(rows)
            for key, dtype in self.fields.items():
                out[key][where] = array_to_torch(arrays[key][local], dtype)
        out[PAD_MASK] = pad_mask(out[SHAPE], *self.max_shape)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__} (use get_batch)")
        return {k: v[0] for k, v in self.get_batch([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Batched fetch used by ``DataLoader``: one gather per field and shard."""
        if len(indices) == 0:
            return []
        batch = self.get_batch(indices)
        keys, columns = list(batch), [v.unbind(0) for v in batch.values()]
        return [dict(zip(keys, row)) for row in zip(*columns)]

    def column(self, name: str) -> torch.Tensor:
        """One field for every sample in global order, ``(N, *shape)`` (reads the whole field)."""
        if name not in self.fields:
            raise KeyError(f"name: expected one of {sorted(self.fields)}, got {name!r}")
        if not self.shards:
            return torch.empty(0, *self.shapes[name], dtype=getattr(torch, self.fields[name]))
        return array_to_torch(np.concatenate([self._arrays(s)[name] for s in range(len(self.shards))]),
                              self.fields[name])

    @property
    def targets(self) -> torch.Tensor:
        """``(N,)`` every target, for :class:`BinnedTargets` and stratified splits."""
        return self.column(TARGET)
