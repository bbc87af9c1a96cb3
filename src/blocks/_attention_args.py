"""Argument checks and small helpers shared by the attention modules (metadata only, no host sync)."""
from __future__ import annotations

import torch

from ._checks import positive_int

__all__ = ["attn_bias_4d", "check_tokens", "head_dim", "key_mask", "zero_blind_queries"]


def check_tokens(x: torch.Tensor, name: str, dim: int, batch: int | None = None) -> None:
    b = "B" if batch is None else str(batch)
    if x.dim() != 3 or x.shape[-1] != dim or (batch is not None and x.shape[0] != batch):
        raise ValueError(f"{name}: expected ({b}, N, {dim}), got {tuple(x.shape)}")


def key_mask(mask: torch.Tensor | None, name: str, batch: int, heads: int, n_q: int,
             n_k: int) -> torch.Tensor | None:
    """Validate a True-means-masked key mask and return it as bool ``(B, 1|H, 1|Nq, Nk)``."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name}: expected a bool (or integer 0/1) mask, True = masked, got {mask.dtype}")
        mask = mask != 0
    shape = tuple(mask.shape)
    if shape == (batch, n_k):
        return mask[:, None, None, :]
    if shape == (batch, n_q, n_k):
        return mask[:, None]
    if shape == (batch, heads, n_q, n_k):
        return mask
    raise ValueError(f"{name}: expected ({batch}, {n_k}), ({batch}, {n_q}, {n_k}) or "
                     f"({batch}, {heads}, {n_q}, {n_k}), got {shape}")


def attn_bias_4d(bias: torch.Tensor | None, name: str, batch: int, heads: int, n_q: int,
                 n_k: int) -> torch.Tensor | None:
    """Validate an additive attention bias and return it as ``(1|B, H, Nq, Nk)``."""
    if bias is None:
        return None
    if not bias.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point additive bias, got {bias.dtype}")
    shape = tuple(bias.shape)
    if shape == (n_q, n_k):
        return bias[None, None]
    if shape == (heads, n_q, n_k):
        return bias[None]
    if shape == (batch, heads, n_q, n_k):
        return bias
    raise ValueError(f"{name}: expected ({n_q}, {n_k}), ({heads}, {n_q}, {n_k}) or "
                     f"({batch}, {heads}, {n_q}, {n_k}), got {shape}")


def zero_blind_queries(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the output tokens ``(B, Nq, C)`` that see no key in any head (projection bias included)."""
    if mask is None:
        return out
    blind = mask.all(dim=-1).all(dim=1)  # (B, 1|Nq)
    return out.masked_fill(blind[..., None], 0.0)


def head_dim(dim: int, heads: int) -> int:
    dim, heads = positive_int("dim", dim), positive_int("heads", heads)
    if dim % heads != 0:
        raise ValueError(f"dim: expected a multiple of heads={heads}, got dim={dim}")
    return dim // heads
