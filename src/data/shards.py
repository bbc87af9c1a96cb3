"""Folder of safetensors shards: padded matrices with their true shapes, side parameters and targets.

The layout suits small variable-size matrices with a few side parameters (System A: k x (n-k)
generator matrices, k in 4..6, n-k in 3..6, side ``(n, k, m)``, target the m-height), stored
zero-padded at the bottom and right to one ``(Kmax, Nmax)`` so batches need no collate logic.
Shards are appended one at a time (e.g. one per generator job) by :func:`write_shard`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._safetensors import DTYPES, CorruptedStoreError, array_to_torch, encode_header, map_file, sha256_file, to_numpy
from .padded import PAD_MASK

try:  # serialises index updates between processes; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["ShardDataset", "write_shard"]

FORMAT = "blockyard.ShardDataset"
INDEX = "index.json"
LOCK = ".index.lock"
MATRIX, SHAPE, SIDE, TARGET = "matrix", "shape", "side", "target"
RESERVED = (MATRIX, SHAPE, SIDE, TARGET, PAD_MASK)
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")


def _tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        arr = np.asarray(value)
        return torch.from_numpy(np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="))))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a tensor or an array of numbers, got {type(value).__name__}") from None


def _matrices(matrices: Any, shapes: Any, pad_to: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(matrices, (list, tuple)):  # variable-size 2-D matrices: pad them here
        if shapes is not None:
            raise ValueError("shapes: pass shapes only with a padded (S, Kmax, Nmax) matrices tensor")
        mats = [_tensor(f"matrices[{i}]", m) for i, m in enumerate(matrices)]
        for i, m in enumerate(mats):
            if m.dim() != 2 or m.dtype != mats[0].dtype or min(m.shape) < 1:
                raise ValueError(f"matrices[{i}]: expected a non-empty 2-D {mats[0].dtype} matrix, "
                                 f"got {tuple(m.shape)} {m.dtype}")
        shape_t = torch.tensor([tuple(m.shape) for m in mats], dtype=torch.int64).reshape(-1, 2)
        K, N = (int(s) for s in shape_t.max(0).values) if mats else (0, 0)
        mat = torch.zeros(len(mats), K, N, dtype=mats[0].dtype if mats else None)
        for i, m in enumerate(mats):
            mat[i, : m.shape[0], : m.shape[1]] = m
    else:
        mat = _tensor("matrices", matrices)
        if mat.dim() != 3:
            raise ValueError(f"matrices: expected (S, Kmax, Nmax) or a list of 2-D matrices, got {tuple(mat.shape)}")
        S, K, N = mat.shape
        if shapes is None:
            shape_t = torch.tensor([[K, N]], dtype=torch.int64).expand(S, 2).clone()
        else:
            shape_t = _tensor("shapes", shapes)
            if shape_t.shape != (S, 2) or shape_t.is_floating_point() or shape_t.dtype == torch.bool:
                raise ValueError(f"shapes: expected ({S}, 2) integers, got {tuple(shape_t.shape)} {shape_t.dtype}")
            shape_t = shape_t.long()
            if S and (shape_t.min() < 1 or shape_t[:, 0].max() > K or shape_t[:, 1].max() > N):
                raise ValueError(f"shapes: expected 1 <= k <= {K} and 1 <= n <= {N}, got mins "
                                 f"{shape_t.min(0).values.tolist()} and maxes {shape_t.max(0).values.tolist()}")
            bad = (mat != 0) & _pad_mask(shape_t, K, N)
            if bool(bad.any()):
                i = int(bad.flatten(1).any(1).nonzero()[0])
                raise ValueError(f"matrices: sample {i} has nonzero values outside its shape {shape_t[i].tolist()}")
    if pad_to is not None:
        if K > pad_to[0] or N > pad_to[1]:
            raise ValueError(f"pad_to: expected at least ({K}, {N}), got {pad_to}")
        mat = torch.nn.functional.pad(mat, (0, pad_to[1] - N, 0, pad_to[0] - K))
    return mat, shape_t


def _pad_mask(shapes: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """``(S, K, N)`` bool, True = padding (outside the true ``(k, n)`` of each row of ``shapes``)."""
    rows = torch.arange(K)[None, :, None] >= shapes[:, 0, None, None]
    cols = torch.arange(N)[None, None, :] >= shapes[:, 1, None, None]
    return rows | cols


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / LOCK, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise CorruptedStoreError(f"{path}: unreadable index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else None
        raise CorruptedStoreError(f"{path}: format {got!r}, expected {FORMAT!r}")
    return index


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(folder: str | os.PathLike, matrices: Any, side: Any, targets: Any, *, shapes: Any = None,
                extras: Mapping[str, Any] | None = None, pad_to: Sequence[int] | None = None,
                name: str | None = None) -> Path:
    """Append one shard to a :class:`ShardDataset` folder (created if needed); return its path.

    ``matrices`` is either a padded ``(S, Kmax, Nmax)`` float tensor/array with ``shapes`` the
    true ``(k, n)`` of each sample (None = every sample fills the padded shape; values outside
    a sample's shape must be 0), or a list of ``S`` 2-D matrices of one float dtype, zero-padded
    here at the bottom and right to ``pad_to`` (default: the largest). Every shard of a folder
    must have the same ``(Kmax, Nmax)``, fields, dtypes and per-sample shapes. Dtypes are kept
    as given (``shape`` is stored as int64).

    Atomic and never overwriting: the shard is written to a temporary file, fsynced and linked
    to its name, which must not exist (``FileExistsError``); then ``index.json`` (file names,
    counts, byte sizes, sha256, field dtypes and shapes) is rewritten through a temporary file
    and ``os.replace``. Index updates hold an exclusive ``flock`` on ``.index.lock``, so several
    processes may append to one folder. A crash between the two steps leaves an unlisted shard
    file, which readers ignore and automatic names skip.

    Args:
        folder: the dataset folder.
        matrices: ``(S, Kmax, Nmax)`` floats, or a list of ``S`` 2-D float matrices.
        side: ``(S, side_dim)`` side parameters (e.g. n, k, m).
        targets: ``(S,)`` regression targets.
        shapes: ``(S, 2)`` ints, the true shape of each padded matrix.
        extras: more per-sample fields, ``{name: (S, ...)}``.
        pad_to: pad the matrices further to ``(Kmax, Nmax)``.
        name: shard file name (``.safetensors`` appended if missing); default ``shard_00000...``.

    Shapes:
        - matrices: ``(S, Kmax, Nmax)`` or ``S x (k_i, n_i)``
        - side: ``(S, side_dim)``; targets: ``(S,)``; shapes: ``(S, 2)``; extras: ``(S, *)``
    """
    folder = Path(folder)
    if pad_to is not None:
        pad_to = tuple(int(p) for p in pad_to)
        if len(pad_to) != 2:
            raise ValueError(f"pad_to: expected (Kmax, Nmax), got {pad_to}")
    mat, shape_t = _matrices(matrices, shapes, pad_to)
    S = mat.shape[0]
    if S == 0:
        raise ValueError("matrices: expected at least one sample, got 0")
    if str(mat.dtype).removeprefix("torch.") not in _FLOATS:
        raise TypeError(f"matrices: expected a float dtype, got {mat.dtype}")
    side_t, target_t = _tensor("side", side), _tensor("targets", targets)
    if side_t.dim() != 2 or side_t.shape[0] != S:
        raise ValueError(f"side: expected ({S}, side_dim), got {tuple(side_t.shape)}")
    if target_t.shape != (S,):
        raise ValueError(f"targets: expected ({S},), got {tuple(target_t.shape)}")
    fields = {MATRIX: mat, SHAPE: shape_t, SIDE: side_t, TARGET: target_t}
    for key, value in (extras or {}).items():
        if not isinstance(key, str) or key in RESERVED or key.startswith("__"):
            raise ValueError(f"extras: name {key!r} is reserved or not a str (reserved: {RESERVED}, '__*')")
        fields[key] = _tensor(f"extras[{key!r}]", value)
        if fields[key].dim() == 0 or fields[key].shape[0] != S:
            raise ValueError(f"extras[{key!r}]: expected ({S}, ...), got {tuple(fields[key].shape)}")
    arrays = {key: to_numpy(value) for key, value in fields.items()}
    schema = {key: {"dtype": dt, "shape": list(arr.shape[1:])} for key, (arr, dt) in arrays.items()}
    if name is not None:
        name = name if name.endswith(".safetensors") else f"{name}.safetensors"
        if not _NAME.match(name):
            raise ValueError(f"name: expected a plain file name of letters, digits, '_', '-', '.', got {name!r}")

    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        index = _read_index(folder) if (folder / INDEX).exists() else {
            "format": FORMAT, "version": 1, "num_samples": 0, "fields": schema, "shards": []}
        for key in sorted(set(schema) | set(index["fields"])):
            if schema.get(key) != index["fields"].get(key):
                raise ValueError(f"{key}: expected {index['fields'].get(key)} like the folder's other shards, "
                                 f"got {schema.get(key)}")
        listed = {s["file"] for s in index["shards"]}
        if name is None:
            i = len(index["shards"])
            while f"shard_{i:05d}.safetensors" in listed or (folder / f"shard_{i:05d}.safetensors").exists():
                i += 1
            name = f"shard_{i:05d}.safetensors"
        target = folder / name
        if name in listed or target.exists():
            raise FileExistsError(f"{target}: shard already exists; shards are never overwritten")
        order = sorted(arrays, key=lambda k: (-DTYPES[arrays[k][1]][1].itemsize, k))  # keeps tensors aligned
        header = encode_header({k: (arrays[k][1], list(arrays[k][0].shape), arrays[k][0].nbytes) for k in order},
                               {"format": FORMAT})
        tmp = folder / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for chunk in (header, *(arrays[k][0].reshape(-1).view(np.uint8) for k in order)):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, target)  # fails instead of replacing a file that appeared meanwhile
            except FileExistsError:
                raise FileExistsError(f"{target}: shard already exists; shards are never overwritten") from None
            except OSError:  # no hard links on this filesystem; the lock still excludes our writers
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        index["shards"].append({"file": name, "count": S, "bytes": target.stat().st_size,
                                "sha256": digest.hexdigest()})
        index["num_samples"] = sum(s["count"] for s in index["shards"])
        tmp_index = folder / f".{INDEX}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp_index, "w") as fh:
            json.dump(index, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_index, folder / INDEX)
        _fsync_dir(folder)
    return target


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
        index = _read_index(self.folder)
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
        out[PAD_MASK] = _pad_mask(out[SHAPE], *self.max_shape)
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
