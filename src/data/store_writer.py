"""Streaming, atomic writer of a :class:`~blockyard.data.GroupedStore` directory."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._safetensors import DTYPES, copy_hashed, encode_header, fsync_dir, to_numpy

__all__ = ["FORMAT", "GroupedStoreWriter"]

FORMAT = "blockyard.GroupedStore"
INDEX = "index.json"
SOURCE = "__source_index__"


class _Group:
    def __init__(self, gid: int, key: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> None:
        self.gid, self.key, self.shapes, self.count = gid, key, shapes, 0
        self.buffers: dict[str, list[bytes]] = {name: [] for name in (*shapes, SOURCE)}


class GroupedStoreWriter:
    """Stream samples into a new store: one safetensors file per spatial-shape group.

    Samples are dicts with the same field names. A field is an array (``torch.Tensor``,
    ``np.ndarray``, numpy or Python number; dtype kept exactly, Python ints become int64 and
    floats float64, so pass ``np.float32(x)`` or a float16 tensor to choose) or a ``str``
    (dictionary-encoded: the distinct values go to the JSON index, an int32 code per sample to
    the safetensors file). Per-sample shapes may differ between groups but not within one.

    Grouping: ``group_key`` is ``None`` (the trailing two dims of the first field with at least
    two dims), a field name (that field's trailing two dims) or a callable ``sample -> tuple of
    ints`` (the group's spatial shape). Spatial fields (the ones :class:`PaddedDataset` pads) are
    ``spatial_fields`` or, by default, the array fields whose trailing dims equal the key in the
    first sample; every later group must agree.

    Streaming: sample bytes are buffered per (group, field) and appended to part files in a
    temporary directory next to ``path`` whenever ``buffer_bytes`` is exceeded, so memory stays
    bounded however large the store. :meth:`close` assembles each group's safetensors file
    (sha256 computed while copying, fsynced), writes ``index.json`` and renames the directory
    into place atomically; a crash leaves no half-written store at ``path``. An existing store is
    never overwritten unless ``overwrite=True`` (and a directory that is not a store, never).

    Global order: samples are numbered group by group (groups in order of first appearance,
    samples in insertion order within a group), so every group is one contiguous index range;
    ``GroupedStore.source_index`` maps each sample back to its insertion position.
    """

    def __init__(self, path: str | os.PathLike, *, group_key: str | Callable[[Mapping], Sequence[int]] | None = None,
                 spatial_fields: Sequence[str] | None = None, overwrite: bool = False,
                 buffer_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        _check_target(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._group_key = group_key
        self._spatial = None if spatial_fields is None else tuple(spatial_fields)
        self._buffer_bytes = buffer_bytes
        self._fields: dict[str, dict[str, Any]] | None = None
        self._vocab: dict[str, dict[str, int]] = {}
        self._groups: dict[tuple[int, ...], _Group] = {}
        self._count = 0
        self._buffered = 0
        self._closed = False

    def __enter__(self) -> GroupedStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_many(self, samples: Iterable[Mapping[str, Any]]) -> None:
        for sample in samples:
            self.add(sample)

    def add(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; every check runs before anything is buffered."""
        if self._closed:
            raise RuntimeError("GroupedStoreWriter: already closed")
        if not isinstance(sample, Mapping):
            raise TypeError(f"sample: expected a dict of named arrays, got {type(sample).__name__}")
        values = {name: _convert(name, value) for name, value in sample.items()}
        if self._fields is None:
            self._init_schema(values)
        assert self._fields is not None
        if set(values) != set(self._fields):
            raise ValueError(f"sample: expected fields {sorted(self._fields)}, got {sorted(values)}")
        for name, spec in self._fields.items():
            got = "str" if isinstance(values[name], str) else values[name][1]
            want = "str" if spec["kind"] == "string" else spec["dtype"]
            if got != want:
                raise TypeError(f"{name}: expected dtype {want}, got {got}")
        key = self._key(sample, values)
        group = self._groups.get(key) or self._new_group(key, values)
        for name, shape in group.shapes.items():
            if isinstance(values[name], tuple) and values[name][0].shape != shape:
                raise ValueError(f"{name}: expected {shape} in group {key}, got {values[name][0].shape}")
        for name in group.shapes:
            value = values[name]
            if isinstance(value, str):
                raw = np.int32(self._vocab[name].setdefault(value, len(self._vocab[name]))).tobytes()
            else:
                raw = value[0].tobytes()
            group.buffers[name].append(raw)
            self._buffered += len(raw)
        group.buffers[SOURCE].append(np.int64(self._count).tobytes())
        group.count += 1
        self._count += 1
        if self._buffered >= self._buffer_bytes:
            self._flush()

    def _init_schema(self, values: dict[str, Any]) -> None:
        if any(name.startswith("__") for name in values):
            raise ValueError(f"sample: field names starting with '__' are reserved, got {sorted(values)}")
        self._fields = {}
        for name, value in values.items():
            if isinstance(value, str):
                self._fields[name] = {"kind": "string", "dtype": "int32"}
                self._vocab[name] = {}
            else:
                self._fields[name] = {"kind": "array", "dtype": value[1]}
        if isinstance(self._group_key, str) and self._fields.get(self._group_key, {}).get("kind") != "array":
            raise ValueError(f"group_key: no array field {self._group_key!r} in {sorted(self._fields)}")
        if self._group_key is None:
            arrays = [n for n, v in values.items() if isinstance(v, tuple) and v[0].ndim >= 2]
            if not arrays:
                raise ValueError("group_key: no field has two dims to group by; pass group_key")
            self._group_key = arrays[0]
        if self._spatial is not None:
            unknown = [n for n in self._spatial if self._fields.get(n, {}).get("kind") != "array"]
            if unknown:
                raise ValueError(f"spatial_fields: {unknown} are not array fields of {sorted(self._fields)}")

    def _key(self, sample: Mapping[str, Any], values: dict[str, Any]) -> tuple[int, ...]:
        if callable(self._group_key):
            return tuple(int(k) for k in self._group_key(sample))
        shape = values[self._group_key][0].shape
        if len(shape) < 2:
            raise ValueError(f"{self._group_key}: expected at least 2 dims to group by, got {shape}")
        return tuple(int(k) for k in shape[-2:])

    def _new_group(self, key: tuple[int, ...], values: dict[str, Any]) -> _Group:
        n = len(key)
        shapes = {name: (() if isinstance(v, str) else v[0].shape) for name, v in values.items()}
        if self._spatial is None:
            self._spatial = tuple(name for name, s in shapes.items()
                                  if isinstance(values[name], tuple) and n and len(s) >= n and s[-n:] == key)
        for name in self._spatial:
            if shapes[name][-n:] != key:
                raise ValueError(f"{name}: expected trailing dims {key} (the group key), got {shapes[name]}")
        group = _Group(len(self._groups), key, shapes)
        self._groups[key] = group
        return group

    def _part(self, group: _Group, name: str) -> Path:
        return self._tmp / f"part_{group.gid}_{name}.bin"

    def _flush(self) -> None:
        for group in self._groups.values():
            for name, chunks in group.buffers.items():
                with open(self._part(group, name), "ab") as fh:
                    fh.write(b"".join(chunks))
                chunks.clear()
        self._buffered = 0

    def close(self) -> Path:
        """Write the group files and the index, then move the store into place."""
        if self._closed:
            raise RuntimeError("GroupedStoreWriter: already closed")
        try:
            self._flush()
            groups = [self._write_group(g) for g in self._groups.values()]
            start = 0
            for meta in groups:
                meta["start"], start = start, start + meta["count"]
            fields = self._fields or {}
            for name, vocab in self._vocab.items():
                fields[name]["values"] = list(vocab)
            index = {"format": FORMAT, "version": 1, "num_samples": self._count,
                     "group_by": self._group_key if isinstance(self._group_key, str | None) else "callable",
                     "spatial_fields": list(self._spatial or ()), "fields": fields, "groups": groups}
            with open(self._tmp / INDEX, "w") as fh:
                json.dump(index, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self._tmp)
            _install(self._tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far; ``path`` is left as it was."""
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _write_group(self, group: _Group) -> dict[str, Any]:
        assert self._fields is not None
        dtypes = {name: self._fields[name]["dtype"] for name in group.shapes}
        dtypes[SOURCE] = "int64"
        shapes = {**group.shapes, SOURCE: ()}
        # Largest item size first keeps every tensor aligned behind the 8-byte-padded header.
        order = sorted(dtypes, key=lambda n: (-DTYPES[dtypes[n]][1].itemsize, n))
        entries = {}
        for name in order:
            nbytes = group.count * int(np.prod(shapes[name], dtype=np.int64)) * DTYPES[dtypes[name]][1].itemsize
            entries[name] = (dtypes[name], [group.count, *shapes[name]], nbytes)
        fname = f"group_{group.gid:04d}_{'x'.join(map(str, group.key)) or 'scalar'}.safetensors"
        digest = hashlib.sha256()
        header = encode_header(entries, {"format": FORMAT, "key": json.dumps(list(group.key))})
        with open(self._tmp / fname, "wb") as out:
            out.write(header)
            digest.update(header)
            for name in order:
                part = self._part(group, name)
                with open(part, "rb") as src:
                    if copy_hashed(src, out, digest) != entries[name][2]:
                        raise RuntimeError(f"{part}: part file size does not match its shape")
                part.unlink()
            out.flush()
            os.fsync(out.fileno())
        return {"key": list(group.key), "file": fname, "count": group.count,
                "shapes": {name: list(s) for name, s in group.shapes.items()},
                "bytes": (self._tmp / fname).stat().st_size, "sha256": digest.hexdigest()}


def _convert(name: str, value: Any) -> str | tuple[np.ndarray, str]:
    if isinstance(value, (str, np.str_)):
        return str(value)
    if not isinstance(value, (torch.Tensor, np.ndarray, np.generic, int, float, bool, list, tuple)):
        raise TypeError(f"{name}: expected an array, a number or a str, got {type(value).__name__}")
    try:
        return to_numpy(value)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None


def _is_store(path: Path) -> bool:
    try:
        with open(path / INDEX) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace a GroupedStore")
    if not path.is_dir() or (any(path.iterdir()) and not _is_store(path)):
        raise FileExistsError(f"{path}: exists and is not a GroupedStore; refusing to overwrite it")


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    _check_target(path, overwrite)  # again: the target may have appeared while we streamed
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
