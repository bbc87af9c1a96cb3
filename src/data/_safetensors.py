"""Minimal streaming reader/writer for the safetensors file layout.

Format: https://github.com/huggingface/safetensors#format. An 8-byte little-endian header
length ``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
(plus an optional ``"__metadata__"`` of str -> str), then the raw little-endian tensor bytes,
offsets relative to the end of the header. We write the layout ourselves so a store can be
streamed to disk field by field without holding a group in memory, and read it with a numpy
memory map so arbitrary row gathers (``mm[[5, 1, 9]]``) touch only those rows. The files are
ordinary safetensors files (the tests read them back with ``safetensors.safe_open``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = [
    "CorruptedStoreError",
    "array_to_torch",
    "copy_hashed",
    "encode_header",
    "fsync_dir",
    "map_file",
    "sha256_file",
    "to_numpy",
]

# fsync errnos meaning "this filesystem does not fsync directories", not a failed write
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})

# torch dtype name -> (safetensors code, numpy dtype of the raw bytes). bfloat16 has no numpy
# dtype, so its bytes travel as uint16 and are re-viewed as bfloat16 on the torch side.
DTYPES: dict[str, tuple[str, np.dtype]] = {
    "bool": ("BOOL", np.dtype(np.bool_)),
    "uint8": ("U8", np.dtype(np.uint8)),
    "int8": ("I8", np.dtype(np.int8)),
    "int16": ("I16", np.dtype("<i2")),
    "uint16": ("U16", np.dtype("<u2")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),
    "int32": ("I32", np.dtype("<i4")),
    "uint32": ("U32", np.dtype("<u4")),
    "float32": ("F32", np.dtype("<f4")),
    "int64": ("I64", np.dtype("<i8")),
    "uint64": ("U64", np.dtype("<u8")),
    "float64": ("F64", np.dtype("<f8")),
}
CODES = {code: name for name, (code, _) in DTYPES.items()}
# Looking a dtype up by identity is ~10x faster than ``dtype.name`` on the per-sample write path.
_NAMES = {np.dtype(t): name for name, t in [("bool", np.bool_), ("uint8", np.uint8), ("int8", np.int8),
                                            ("int16", np.int16), ("uint16", np.uint16), ("float16", np.float16),
                                            ("int32", np.int32), ("uint32", np.uint32), ("float32", np.float32),
                                            ("int64", np.int64), ("uint64", np.uint64), ("float64", np.float64)]}


class CorruptedStoreError(ValueError):
    """A store file is missing, truncated, modified or does not match the store's index."""


def to_numpy(value: torch.Tensor | np.ndarray) -> tuple[np.ndarray, str]:
    """Return ``(little-endian contiguous array of the raw bytes, torch dtype name)``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise TypeError(f"unsupported dtype {t.dtype}; supported: {sorted(DTYPES)}")
        if name == "bfloat16":
            t = t.view(torch.uint16)
        return np.asarray(t.numpy(), dtype=DTYPES[name][1], order="C"), name
    arr = np.asarray(value)
    name = _NAMES.get(arr.dtype) or arr.dtype.name  # the fallback catches byte-swapped dtypes
    if name not in DTYPES or name == "bfloat16":
        raise TypeError(f"unsupported dtype {arr.dtype}; supported: {sorted(DTYPES)}")
    return np.asarray(arr, dtype=DTYPES[name][1], order="C"), name


def array_to_torch(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    """Copy ``arr`` (raw bytes as read from a memory map) into a torch tensor of ``dtype_name``."""
    t = torch.from_numpy(np.array(arr, copy=True))
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def encode_header(entries: dict[str, tuple[str, list[int], int]], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in ``entries`` order.

    ``entries`` maps name -> (torch dtype name, shape, nbytes). The JSON is padded with spaces
    to a multiple of 8 bytes, as the reference writer does, so every tensor stays aligned.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype_name, shape, nbytes) in entries.items():
        header[name] = {"dtype": DTYPES[dtype_name][0], "shape": shape,
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def map_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a safetensors file: ``({name: read-only ndarray view}, {name: torch dtype name})``.

    Nothing but the header is read; rows are paged in when indexed.
    """
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if mm.size < 8:
        raise CorruptedStoreError(f"{path}: truncated file ({mm.size} bytes)")
    (n,) = struct.unpack("<Q", mm[:8].tobytes())
    if 8 + n > mm.size:
        raise CorruptedStoreError(f"{path}: header length {n} exceeds the file size {mm.size}")
    try:
        header = json.loads(mm[8:8 + n].tobytes())
    except ValueError as err:
        raise CorruptedStoreError(f"{path}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    base = 8 + n
    arrays: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for name, info in header.items():
        dtype_name = CODES.get(info["dtype"])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if dtype_name is None or base + end > mm.size:
            raise CorruptedStoreError(f"{path}: tensor {name!r} has a bad dtype or lies past the end")
        np_dtype = DTYPES[dtype_name][1]
        count = int(np.prod(shape, dtype=np.int64))
        if count * np_dtype.itemsize != end - begin:
            raise CorruptedStoreError(f"{path}: tensor {name!r} size does not match its shape {shape}")
        arrays[name] = np.frombuffer(mm, dtype=np_dtype, count=count, offset=base + begin).reshape(shape)
        names[name] = dtype_name
    return arrays, names


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streamed sha256 (constant memory; the file is read through, never mapped)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_hashed(src: BinaryIO, dst: BinaryIO, digest: hashlib._Hash, chunk: int = 1 << 22) -> int:
    """Copy ``src`` into ``dst`` while feeding ``digest``; return the number of bytes."""
    total = 0
    while block := src.read(chunk):
        digest.update(block)
        dst.write(block)
        total += len(block)
    return total


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (files created or renamed into it) durable across a crash.

    The one implementation for the whole library (data stores, atomic JSON writes, checkpoints).
    On Windows a directory cannot be opened for fsync (``os.open`` raises); the call returns and
    rename durability is left to the filesystem. A filesystem that cannot fsync directories
    (``EINVAL``/``ENOTSUP`` from ``fsync``) is tolerated the same way; any other error (a
    missing directory, ``EIO``) is raised.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)
