"""Pickle-free encoding of training state: a JSON tree plus a flat dict of tensors for safetensors.

``torch.save`` pickles, and loading a pickle runs arbitrary code; since PyTorch 2.6
``torch.load(weights_only=True)`` refuses common state such as ``np.random.get_state()``.
This module turns any state dict built from the usual pieces (nested dicts, lists, tuples,
tensors, numpy arrays and scalars, python scalars, ``torch.dtype``/``torch.device``) into a
JSON-serialisable tree in which every tensor is replaced by a reference into a flat
``{name: tensor}`` dict that ``safetensors`` can store, and back again, exactly.
"""
from __future__ import annotations

import json
import math
from typing import Any, BinaryIO, Callable

import numpy as np
import safetensors.torch
import torch

__all__ = ["decode_state", "dumps_json", "encode_state", "pack", "pack_parts", "unpack", "unpack_file"]

_META_KEY = "blockyard.tree"
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}  # safetensors' dtype codes for the dtypes pack_parts lays out itself

# A dict whose only key is one of these is a tagged value; a user dict of that shape is
# stored in the explicit "__dict__" form so it can never be mistaken for one.
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "__dtype__", "__device__",
         "__npscalar__")


def dumps_json(tree: Any) -> bytes:
    """Compact JSON bytes (strict: no NaN); floats are written with ``repr`` so they round-trip exactly."""
    return json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} in checkpoint")
    return dtype


class _Encoder:
    def __init__(self, keep_tensors: bool = False) -> None:
        self.keep_tensors = keep_tensors
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, str] = {}  # exact view identity -> stored name (aliases)
        self._storages: set[int] = set()

    def _name(self, path: list[str]) -> str:
        base = ".".join(path) or "tensor"
        name, i = base, 1
        while name in self.tensors:
            name, i = f"{base}#{i}", i + 1
        return name

    def tensor(self, t: torch.Tensor, path: list[str]) -> str:
        t = t.detach()
        if self.keep_tensors:  # for torch.distributed.checkpoint, which writes (DTensor) shards itself
            name = self._name(path)
            self.tensors[name] = t
            return name
        if hasattr(t, "to_local"):
            raise TypeError(f"{'.'.join(path)}: a DTensor (a shard of a model sharded by shard_model / FSDP2) "
                            "cannot be saved whole by one process; use CheckpointManager(..., sharded=True)")
        if t.layout != torch.strided:
            raise TypeError(f"{'.'.join(path)}: only dense tensors can be checkpointed, got {t.layout}")
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        view = (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ptr and view in self._views:  # the same tensor reached twice (e.g. tied weights)
            return self._views[view]
        name = self._name(path)
        cpu = t.to("cpu").contiguous()
        # safetensors refuses aliased storage, and a view must not drag its whole base buffer
        # onto disk: a tensor sharing storage with one already stored, or covering only part of
        # its storage, is stored as its own copy.
        if ptr in self._storages or cpu.untyped_storage().nbytes() != cpu.numel() * cpu.element_size():
            cpu = cpu.clone()
        if ptr:
            self._storages.add(ptr)
            self._views[view] = name
        self.tensors[name] = cpu
        return name

    def encode(self, obj: Any, path: list[str]) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int) and not isinstance(obj, bool):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self.tensor(obj, path)}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError(f"{'.'.join(path)}: object arrays cannot be checkpointed without pickle")
            try:
                t = torch.from_numpy(np.ascontiguousarray(obj))
            except TypeError as err:
                raise TypeError(f"{'.'.join(path)}: numpy dtype {obj.dtype} cannot be checkpointed") from err
            return {"__ndarray__": self.tensor(t, path)}
        if isinstance(obj, np.generic):
            return {"__npscalar__": obj.dtype.str, "value": self.encode(obj.item(), path)}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": _dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {"__device__": str(obj)}
        if isinstance(obj, tuple):  # torch.Size and NamedTuples come back as plain tuples
            return {"__tuple__": [self.encode(v, [*path, str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, [*path, str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            items = [(k, self.encode(v, [*path, str(k)])) for k, v in obj.items()]
            plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS)
            if plain:
                return dict(items)
            return {"__dict__": [[self.encode(k, [*path, "key"]), v] for k, v in items]}
        raise TypeError(
            f"{'.'.join(path) or 'state'}: cannot checkpoint a value of type {type(obj).__name__} "
            "without pickle; give it state_dict()/load_state_dict() or convert it to plain values")


def encode_state(obj: Any, keep_tensors: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-serialisable tree and a flat dict of contiguous CPU tensors.

    With ``keep_tensors`` the tensors are returned as they are (DTensor shards included, on their
    device, one name per path even where two paths reach the same tensor), for a writer that
    stores shards itself (:mod:`blockyard.train.sharded_checkpoint`).

    Tensor names are the dotted path to the tensor, so a module's ``state_dict`` keeps its
    own keys. A tensor reached twice (tied weights, shared optimizer entries) is stored once
    and comes back as one tensor; a partial view of another stored tensor gets its own copy.
    Dict key types (``int`` keys of optimizer state), tuples, non-finite floats, numpy
    arrays and scalars survive the round trip.
    """
    enc = _Encoder(keep_tensors)
    tree = enc.encode(obj, [])
    return tree, enc.tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`; tensors come back on the CPU."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1 or "__npscalar__" in tree:
        key = next(iter(tree)) if "__npscalar__" not in tree else "__npscalar__"
        val = tree[key]
        if key == "__tensor__":
            return tensors[val]
        if key == "__ndarray__":
            return tensors[val].numpy().copy()
        if key == "__tuple__":
            return tuple(decode_state(v, tensors) for v in val)
        if key == "__dict__":
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in val}
        if key == "__float__":
            return float(val)
        if key == "__dtype__":
            return _parse_dtype(val)
        if key == "__device__":
            return torch.device(val)
        if key == "__npscalar__":
            return np.dtype(val).type(decode_state(tree["value"], tensors))
    return {k: decode_state(v, tensors) for k, v in tree.items()}



def pack(obj: Any, **header: Any) -> bytes:
    """Encode ``obj`` as one safetensors blob: its tensors, plus the JSON tree (and ``header``)
    in the file's string metadata. Loadable by any safetensors reader; no pickle involved."""
    return b"".join(pack_parts(obj, **header))


def pack_parts(obj: Any, **header: Any) -> list[bytes | memoryview]:
    """:func:`pack`'s blob in parts, in order: ``length + header``, then each tensor's bytes as a
    view of the tensor itself (nothing copied into one more buffer; write and hash them in turn)."""
    tree, tensors = encode_state(obj)
    meta = {"format": "pt", _META_KEY: dumps_json({"tree": tree, **header}).decode()}
    if any(t.dtype not in _CODES for t in tensors.values()):  # dtypes we do not lay out ourselves
        raw = safetensors.torch.save(tensors)
        n = int.from_bytes(raw[:8], "little")
        # The metadata is inserted here rather than by safetensors, which writes its keys in hash
        # order: the same state must give the same bytes (and sha256) in every process.
        return [_head({"__metadata__": meta, **json.loads(raw[8:8 + n])}), memoryview(raw)[8 + n:]]
    # safetensors' own layout: widest dtype first, then by name, so every tensor stays aligned
    layout: dict[str, Any] = {"__metadata__": meta}
    parts: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name]  # contiguous, on the CPU, owning its storage (encode_state)
        nbytes = t.numel() * t.element_size()
        layout[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if nbytes:
            parts.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return [_head(layout), *parts]


def _head(layout: dict[str, Any]) -> bytes:
    head = dumps_json(layout)
    head += b" " * (-len(head) % 8)  # safetensors aligns the data section to 8 bytes
    return len(head).to_bytes(8, "little") + head


def unpack_file(f: BinaryIO, size: int, update: Callable[[Any], None]) -> tuple[Any, dict[str, Any]] | None:
    """:func:`unpack` of the ``size``-byte blob in file ``f``, reading each tensor straight into
    its own fresh tensor (no intermediate buffer) and passing every byte read, in order, to
    ``update`` (e.g. a hash's). Returns None, with every byte consumed, when the blob uses a layout
    this reader does not handle (read it whole and call :func:`unpack`).

    Raises:
        ValueError: when the blob is malformed (the rest of the file is consumed first, so a
            checksum over ``update`` can tell corruption from a bad writer).
    """
    done = 0

    def read(n: int) -> bytes:
        nonlocal done
        chunk = f.read(n)
        update(chunk)
        done += len(chunk)
        return chunk

    def drain() -> None:
        while done < size and read(min(1 << 24, size - done)):
            pass

    try:
        if size < 8:
            raise ValueError(f"not a safetensors blob ({size} bytes)")
        n = int.from_bytes(read(8), "little")
        if n > size - 8:
            raise ValueError("safetensors header runs past the end of the data")
        layout = json.loads(read(n))
        meta = layout.pop("__metadata__", None) or {}
        if _META_KEY not in meta:
            raise ValueError(f"safetensors blob has no {_META_KEY!r} metadata")
        header = json.loads(meta[_META_KEY])
        dtypes = {code: dtype for dtype, code in _CODES.items()}
        entries, offset = [], 0
        for name, info in sorted(layout.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = dtypes.get(info["dtype"])
            begin, end = info["data_offsets"]
            shape = tuple(int(v) for v in info["shape"])
            if dtype is None:
                drain()
                return None
            if begin != offset or end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"safetensors entry {name!r}: offsets {begin}..{end} do not follow on at "
                                 f"{offset} or do not fit shape {shape} in {size} bytes")
            entries.append((name, dtype, shape))
            offset = end
        if 8 + n + offset != size:
            raise ValueError(f"safetensors blob: {size - 8 - n} data bytes, the header accounts for {offset}")
        tensors = {}
        for name, dtype, shape in entries:
            t = torch.empty(shape, dtype=dtype)
            if t.numel():
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                got = f.readinto(view)
                while got < len(view):  # readinto may return short counts
                    more = f.readinto(view[got:])
                    if not more:
                        raise ValueError(f"safetensors entry {name!r}: file ends inside it")
                    got += more
                update(view)
                done += got
            tensors[name] = t
    except (ValueError, KeyError, TypeError):
        drain()
        raise
    return decode_state(header.pop("tree"), tensors), header


def unpack(data: bytes) -> tuple[Any, dict[str, Any]]:
    """Inverse of :func:`pack`: returns ``(obj, header)``; tensors are fresh, writable CPU tensors.

    Raises:
        ValueError: when ``data`` is not a blob written by :func:`pack`.
    """
    if len(data) < 8:
        raise ValueError(f"not a safetensors blob ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("safetensors header runs past the end of the data")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if _META_KEY not in meta:
        raise ValueError(f"safetensors blob has no {_META_KEY!r} metadata")
    header = json.loads(meta[_META_KEY])
    # clone: safetensors hands out views of the (read-only) input buffer
    tensors = {k: v.clone() for k, v in safetensors.torch.load(data).items()}
    return decode_state(header.pop("tree"), tensors), header
