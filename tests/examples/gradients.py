"""Gradient checks of the example models: every parameter that should learn gets a gradient."""
from __future__ import annotations

import torch
from torch import nn


def leave_identity_init(module: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every all-zero parameter random values (normal, ``std``), in place.

    Residual branches that start as the identity (zero-init output projections, GRN's gamma and
    beta) pass no gradient to the parameters before them on the first step; off that state, every
    parameter the forward uses must get one.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def without_gradient(module: nn.Module) -> set[str]:
    """Names of the trainable parameters of ``module`` whose gradient is missing or all zero."""
    return {name for name, p in module.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.any()))}
