"""Data-dependent argument checks for losses and metrics, without a host sync off the CPU."""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["check_all"]


def check_all(ok: torch.Tensor, expected: str, got: Callable[[], str]) -> None:
    """Raise ``ValueError(f"{expected}, got {got()}")`` unless every element of the bool ``ok`` is True.

    ``expected`` names the argument and what it must satisfy (``"centers: expected ..."``);
    ``got`` describes the offending values and is only called on failure.

    - eager, CPU tensor: checked exactly, ``ValueError`` (reading a CPU tensor syncs nothing);
    - other devices, and anywhere under ``torch.compile``: ``torch._assert_async(ok.all(),
      expected)``, queued with no host sync and no graph break; a failure surfaces as a
      ``RuntimeError`` carrying ``expected`` (on CUDA a device-side assert at the next sync).
    """
    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        torch._assert_async(ok.all(), expected)
    elif not bool(ok.all()):
        raise ValueError(f"{expected}, got {got()}")
