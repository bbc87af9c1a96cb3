"""Grouped, memory-mapped sample storage: one safetensors file per spatial shape, a JSON index.

Variable-size samples (grids of 16x16 ... 32x32) are stored at their natural resolution,
grouped by shape, instead of padded to the largest size: the seed's padded float32 layout
needed 92 GB where grouped float16 storage needed 1.7 GB, and its single ``torch.save`` file had
to be loaded once per DDP rank until it was memory-mapped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._safetensors import DTYPES, CorruptedStoreError, array_to_torch, map_file, sha256_file
from .store_writer import FORMAT, INDEX, SOURCE, GroupedStoreWriter

__all__ = ["CorruptedStoreError", "GroupedStore", "StoreGroup"]


class StoreGroup(NamedTuple):
    """One shape group: its key (spatial shape), per-sample field shapes and index range."""

    key: tuple[int, ...]
    shapes: dict[str, tuple[int, ...]]
    start: int
    stop: int
    file: str

    @property
    def count(self) -> int:
        return self.stop - self.start


class GroupedStore:
    """Read-only, lazily memory-mapped store of samples grouped by spatial shape.

    Layout of the directory ``path``:

    - ``index.json``: format tag, ``num_samples``, the fields (dtype, and the distinct values of
      string fields), the spatial fields, and per group its key, per-sample shapes, file name,
      byte size, sha256, ``start`` and ``count`` (group ``g`` holds global indices
      ``start .. start+count-1``; see :class:`GroupedStoreWriter` for the numbering);
    - ``group_NNNN_<H>x<W>.safetensors``: every field stacked along a leading sample dim,
      dtype exactly as written, plus ``__source_index__`` (insertion position of each sample).

    Opening reads the index and checks its structure (a valid JSON of the wrong shape, or a
    ``num_samples`` that is not the sum of the group counts, is a :class:`CorruptedStoreError`),
    every group file's size and, with ``verify=True`` (default), its sha256 (streamed, constant
    memory; a :class:`CorruptedStoreError` names the bad file). A group file's header (row count,
    shapes, dtypes) is checked against the index when the file is first mapped. Data is never
    loaded: each process memory-maps the files on first access (the maps are dropped when the
    store is pickled to a DataLoader worker and re-opened there), so only the
    rows touched are paged in and DDP ranks on one node share the page cache instead of
    holding one copy each. Hashing reads every byte once: under DDP, verify on one rank
    (``verify=dist_info.is_main``) and open with ``verify=False`` elsewhere.

    Args:
        path: store directory written by :meth:`write` or :class:`GroupedStoreWriter`.
        verify: check every file's sha256 against the index on open.

    Shapes:
        - ``store[i]``: ``{field: tensor of the per-sample shape}``; string fields give ``str``
        - ``store.get_batch(idx)``: ``{field: (len(idx), *shape)}``; string fields give ``list[str]``
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a GroupedStore (no {INDEX})")
        try:
            index = json.loads(index_path.read_text())
        except ValueError as err:
            raise CorruptedStoreError(f"{index_path}: unreadable index ({err})") from None
        _check_index(index, index_path)
        self._index = index
        self.fields: dict[str, str] = {n: ("str" if f["kind"] == "string" else f["dtype"])
                                       for n, f in index["fields"].items()}
        self.spatial_fields: tuple[str, ...] = tuple(index["spatial_fields"])
        self._values = {n: f["values"] for n, f in index["fields"].items() if f["kind"] == "string"}
        self.groups: tuple[StoreGroup, ...] = tuple(
            StoreGroup(tuple(g["key"]), {n: tuple(s) for n, s in g["shapes"].items()},
                       g["start"], g["start"] + g["count"], g["file"]) for g in index["groups"])
        self._stops = np.array([g.stop for g in self.groups], dtype=np.int64)
        for meta in index["groups"]:
            file = self.path / meta["file"]
            if not file.is_file():
                raise CorruptedStoreError(f"{file}: group file is missing")
            if file.stat().st_size != meta["bytes"]:
                raise CorruptedStoreError(
                    f"{file}: size {file.stat().st_size} bytes, index says {meta['bytes']} (truncated?)")
            if verify and sha256_file(file) != meta["sha256"]:
                raise CorruptedStoreError(f"{file}: sha256 does not match the index; the file is corrupted")
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def write(cls, path: str | os.PathLike, samples: Iterable[Mapping[str, Any]], *,
              group_key: str | Callable[[Mapping], Sequence[int]] | None = None,
              spatial_fields: Sequence[str] | None = None, overwrite: bool = False,
              buffer_bytes: int = 64 << 20) -> GroupedStore:
        """Write ``samples`` (any iterable, consumed once, streamed) and return the opened store.

        Keywords as in :class:`GroupedStoreWriter`. Raises ``FileExistsError`` if ``path``
        exists, unless ``overwrite=True`` and it is a store.
        """
        with GroupedStoreWriter(path, group_key=group_key, spatial_fields=spatial_fields,
                                overwrite=overwrite, buffer_bytes=buffer_bytes) as writer:
            writer.add_many(samples)
        return cls(path, verify=False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are per process; workers re-open lazily
        return state

    def __len__(self) -> int:
        return int(self._index["num_samples"])

    def __repr__(self) -> str:
        keys = ", ".join(f"{'x'.join(map(str, g.key))}:{g.count}" for g in self.groups)
        return f"GroupedStore({str(self.path)!r}, n={len(self)}, groups=[{keys}])"

    @property
    def group_ids(self) -> np.ndarray:
        """``(N,)`` int64: the group number of every sample."""
        return np.repeat(np.arange(len(self.groups)), [g.count for g in self.groups])

    def group_of(self, index: int | Sequence[int] | np.ndarray) -> int | np.ndarray:
        """Group number(s) of global index(es)."""
        idx = self._check(index)
        out = np.searchsorted(self._stops, idx, side="right")
        return int(out) if out.ndim == 0 else out

    def _check(self, index: int | Sequence[int] | np.ndarray, name: str = "index") -> np.ndarray:
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if idx.size == 0:  # np.asarray([]) is float64: an empty list is empty, not of the wrong type
            idx = idx.astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integers, got {idx.dtype}")
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"{name}: out of range for a store of {n} samples")
        return np.where(idx < 0, idx + n, idx).astype(np.int64)

    def _arrays(self, g: int) -> dict[str, np.ndarray]:
        arrays = self._maps.get(g)
        if arrays is None:
            group = self.groups[g]
            file = self.path / group.file
            arrays, dtypes = map_file(file)
            for name, spec in self._index["fields"].items():
                want = (group.count, *group.shapes[name])
                if name not in arrays or arrays[name].shape != want or dtypes[name] != spec["dtype"]:
                    raise CorruptedStoreError(f"{file}: field {name!r} does not match the index")
            self._maps[g] = arrays
        return arrays

    def _decode(self, name: str, raw: np.ndarray) -> Any:
        if name in self._values:
            values = self._values[name]
            return values[int(raw)] if raw.ndim == 0 else [values[int(c)] for c in raw]
        return array_to_torch(raw, self.fields[name])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__} (use get_batch)")
        i = int(self._check(index))
        g = int(np.searchsorted(self._stops, i, side="right"))
        local = i - self.groups[g].start
        arrays = self._arrays(g)
        return {name: self._decode(name, arrays[name][local]) for name in self.fields}

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, Any]:
        """Gather several samples of ONE group in one read per field (any order, repeats allowed)."""
        idx = self._check(indices, "indices").reshape(-1)
        if idx.size == 0:
            raise ValueError("indices: expected at least one index, got 0")
        g = int(np.searchsorted(self._stops, idx[0], side="right"))
        group = self.groups[g]
        if idx.min() < group.start or idx.max() >= group.stop:
            raise ValueError(f"indices: expected all in group {g} (range {group.start}..{group.stop - 1}), "
                             f"got groups {sorted(set(np.searchsorted(self._stops, idx, side='right').tolist()))}")
        arrays = self._arrays(g)
        local = idx - group.start
        return {name: self._decode(name, arrays[name][local]) for name in self.fields}

    def column(self, name: str) -> torch.Tensor | list[str]:
        """One field for every sample, in global order (its per-sample shape must agree across groups)."""
        if name not in self.fields and name != SOURCE:
            raise KeyError(f"name: expected one of {sorted(self.fields)}, got {name!r}")
        parts = [self._arrays(g)[name] for g in range(len(self.groups))]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError(f"{name}: per-sample shapes differ between groups; read it per group")
        if name in self._values:
            return [self._values[name][int(c)] for p in parts for c in p]
        dtype = "int64" if name == SOURCE else self.fields[name]
        if not parts:
            return torch.empty(0)
        return array_to_torch(np.concatenate(parts), dtype)

    @property
    def source_index(self) -> np.ndarray:
        """``(N,)`` int64: the position at which each sample was added to the writer."""
        return self.column(SOURCE).numpy() if self.groups else np.zeros(0, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Total bytes on disk (group files and index)."""
        return sum(g["bytes"] for g in self._index["groups"]) + (self.path / INDEX).stat().st_size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_index(index: Any, where: Path) -> None:
    """Raise :class:`CorruptedStoreError` unless ``index`` has the structure the writer produces."""
    def bad(what: str) -> CorruptedStoreError:
        return CorruptedStoreError(f"{where}: {what}")

    if not isinstance(index, dict):
        raise bad(f"expected a JSON object, got {type(index).__name__}")
    if index.get("format") != FORMAT:
        raise bad(f"format {index.get('format')!r}, expected {FORMAT!r}")
    num, fields, spatial, groups = (index.get(k) for k in ("num_samples", "fields", "spatial_fields", "groups"))
    if not _is_int(num) or num < 0:
        raise bad(f"num_samples: expected an int >= 0, got {num!r}")
    if not isinstance(fields, dict) or not all(
            isinstance(f, dict) and f.get("kind") in ("array", "string") and f.get("dtype") in DTYPES
            and (f["kind"] == "array" or isinstance(f.get("values"), list)) for f in fields.values()):
        raise bad(f"fields: expected {{name: {{kind, dtype[, values]}}}}, got {fields!r}"[:300])
    if not isinstance(spatial, list) or not all(isinstance(n, str) for n in spatial):
        raise bad(f"spatial_fields: expected a list of field names, got {spatial!r}")
    if not isinstance(groups, list):
        raise bad(f"groups: expected a list, got {type(groups).__name__}")
    start = 0
    for g, meta in enumerate(groups):
        ok = (isinstance(meta, dict) and isinstance(meta.get("key"), list) and all(map(_is_int, meta["key"]))
              and isinstance(meta.get("file"), str) and Path(meta["file"]).name == meta["file"]
              and isinstance(meta.get("sha256"), str) and _is_int(meta.get("bytes"))
              and _is_int(meta.get("count")) and meta["count"] >= 0 and meta.get("start") == start
              and isinstance(meta.get("shapes"), dict) and meta["shapes"].keys() == fields.keys()
              and all(isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v) for v in meta["shapes"].values()))
        if not ok:
            raise bad(f"groups[{g}]: expected {{key, file, count, start={start}, shapes of {sorted(fields)}, "
                      f"bytes, sha256}}, got {meta!r}"[:400])
        start += meta["count"]
    if start != num:
        raise bad(f"num_samples: {num}, but the groups hold {start} samples")
