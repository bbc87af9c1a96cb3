"""Writer of the shard folders :class:`~blockyard.data.shards.ShardDataset` reads.

Each :func:`write_shard` call adds one safetensors shard (padded matrices, their true shapes,
side parameters, targets, extras) and updates the folder's ``index.json`` under a file lock.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._safetensors import DTYPES, encode_header, to_numpy
from .atomic import write_json_atomic
from .lock import file_lock
from .shard_format import FORMAT, INDEX, MATRIX, RESERVED, SHAPE, SIDE, TARGET, pad_mask, read_index

__all__ = ["write_shard"]

LOCK = ".index.lock"
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
            bad = (mat != 0) & pad_mask(shape_t, K, N)
            if bool(bad.any()):
                i = int(bad.flatten(1).any(1).nonzero()[0])
                raise ValueError(f"matrices: sample {i} has nonzero values outside its shape {shape_t[i].tolist()}")
    if pad_to is not None:
        if K > pad_to[0] or N > pad_to[1]:
            raise ValueError(f"pad_to: expected at least ({K}, {N}), got {pad_to}")
        mat = torch.nn.functional.pad(mat, (0, pad_to[1] - N, 0, pad_to[0] - K))
    return mat, shape_t


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
    with file_lock(folder / LOCK):
        index = read_index(folder) if (folder / INDEX).exists() else {
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
        write_json_atomic(folder / INDEX, index)  # under the lock: one writer at a time
    return target


