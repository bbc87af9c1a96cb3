"""Capture and restore, in place, the objects a training state is made of.

A checkpoint entry is an ``nn.Module`` (possibly wrapped by DDP or ``torch.compile``), any
object with ``state_dict``/``load_state_dict`` (optimizers, LR schedulers, GradScaler, EMA,
early stopping), an explicit ``torch.Generator`` or a numpy ``Generator``/``RandomState``.
Anything else is a plain value, returned rather than restored.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import unwrap

__all__ = ["capture_object", "object_kind", "restore_object"]


def _canonical(key: str) -> str:
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def match_prefixed_keys(saved: dict[str, Any], target: list[str]) -> dict[str, Any]:
    """Rename ``saved`` keys onto ``target`` keys that differ only by ``module.``/``_orig_mod.``.

    Exact matches are kept as they are; when the prefix-free names are ambiguous nothing is
    renamed, so ``load_state_dict`` reports the mismatch itself.
    """
    if set(saved) == set(target):
        return saved
    by_canon: dict[str, str] = {}
    for k in saved:
        by_canon.setdefault(_canonical(k), k)
    if len(by_canon) != len(saved):
        return saved
    out: dict[str, Any] = {}
    used: set[str] = set()
    for k in target:
        src = by_canon.get(_canonical(k))
        if src is not None:
            out[k] = saved[src]
            used.add(src)
    out.update({k: v for k, v in saved.items() if k not in used})
    return out


def object_kind(obj: Any) -> str | None:
    """``"module"``, ``"torch_generator"``, ``"numpy_generator"``, ``"stateful"`` or ``None`` (plain value)."""
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, torch.Generator):
        return "torch_generator"
    if isinstance(obj, (np.random.Generator, np.random.RandomState)):
        return "numpy_generator"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "stateful"
    return None


def capture_object(obj: Any) -> tuple[str, Any, dict[str, Any]]:
    """Return ``(kind, payload, header)``: the object's state and JSON-able side information.

    A module is unwrapped first, so its weights are stored under their bare names.
    """
    kind = object_kind(obj)
    if kind is None:
        raise TypeError(f"cannot capture the state of a {type(obj).__name__}")
    if kind == "module":
        sd = unwrap(obj).state_dict()
        meta = getattr(sd, "_metadata", None) or {}
        return kind, dict(sd), {"module_metadata": {k: dict(v) for k, v in meta.items()}}
    if kind == "torch_generator":
        return kind, obj.get_state(), {}
    if kind == "numpy_generator":
        if isinstance(obj, np.random.Generator):
            return kind, obj.bit_generator.state, {}
        return kind, obj.get_state(legacy=False), {}
    return kind, obj.state_dict(), {}


def restore_object(obj: Any, payload: Any, header: dict[str, Any]) -> None:
    """Load ``payload`` (from :func:`capture_object`) into ``obj`` in place.

    Modules load strictly, accepting ``module.`` and ``_orig_mod.`` key prefixes in either
    direction (saved wrapped and loaded bare, or the reverse).
    """
    kind = object_kind(obj)
    if kind == "module":
        target = unwrap(obj)
        sd = match_prefixed_keys(payload, list(target.state_dict().keys()))
        if sd is payload:
            sd = OrderedDict(payload)
            sd._metadata = OrderedDict(header.get("module_metadata") or {})  # type: ignore[attr-defined]
        target.load_state_dict(sd, strict=True)
    elif kind == "torch_generator":
        obj.set_state(payload)
    elif kind == "numpy_generator":
        if isinstance(obj, np.random.Generator):
            obj.bit_generator.state = payload
        else:
            obj.set_state(payload)
    elif kind == "stateful":
        obj.load_state_dict(payload)
    else:
        raise TypeError(f"cannot restore state into a {type(obj).__name__}")
