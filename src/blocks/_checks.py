"""Argument checks shared by the blocks: metadata only (no host sync), ``torch.compile``-friendly."""
from __future__ import annotations

from numbers import Integral

import torch

__all__ = ["check_float_input", "positive_int"]


def positive_int(name: str, value, *, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (or None when ``optional``), else TypeError/ValueError naming ``name``."""
    if value is None and optional:
        return None
    expected = f"{'None or ' if optional else ''}an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return int(value)


def check_float_input(x: torch.Tensor, name: str, param_dtype: torch.dtype) -> None:
    """Reject a non-floating ``x``, and an ``x`` whose dtype differs from the parameters' outside autocast.

    Under ``torch.autocast`` for ``x``'s device the ops cast their inputs themselves, so any
    floating dtype is accepted there. Otherwise torch would fail deep inside a conv or matmul
    ("Input type (HalfTensor) and weight type (FloatTensor) should be the same") or, for
    integer input, in a dtype-less message.
    """
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor ({param_dtype}), got {x.dtype}")
    if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: expected {param_dtype} (the parameters' dtype; cast the input or the "
                        f"module, or run under torch.autocast), got {x.dtype}")
