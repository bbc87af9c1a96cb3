"""Counting a model's parameters."""
from __future__ import annotations

from torch import nn

__all__ = ["count_parameters"]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of real scalars in ``module``'s parameters.

    A complex parameter counts 2 per element (its real and imaginary parts); a complex weight
    stored as a real view with a trailing dimension of 2 (as :class:`SpectralConv2d` stores
    its weights) counts 2 per complex element as well. Parameters shared between submodules
    are counted once.

    Args:
        module: the model (wrapped by DDP or ``torch.compile`` or not: their parameters are
            the wrapped model's).
        trainable_only: count only parameters with ``requires_grad``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    return sum(p.numel() * (2 if p.is_complex() else 1)
               for p in module.parameters() if p.requires_grad or not trainable_only)
