"""Stochastic depth.

Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016. https://arxiv.org/abs/1603.09382
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DropPath", "drop_path"]


def drop_path(x: torch.Tensor, p: float = 0.0, training: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``p``; rescale the rest by ``1/(1-p)``.

    The identity when ``p == 0`` or not ``training``. With ``p == 1`` every sample is dropped
    (the output is zero, never NaN).

    Shapes:
        - x: ``(B, *)``
        - output: same as ``x``
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep, generator=generator)
    return x * mask.div_(keep) if keep > 0.0 else x * mask


class DropPath(nn.Module):
    """Per-sample stochastic depth for residual branches: :func:`drop_path` as a module.

    Args:
        p: probability of dropping a sample's branch during training.

    Shapes:
        - x: ``(B, *)``
        - output: same as ``x``
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero whole samples with probability ``p`` in training and rescale the rest.

        Args:
            x: ``(B, *)`` residual branch.

        Returns:
            Same shape as ``x``: ``x * keep / (1 - p)`` per sample in training, ``x`` in eval mode.
        """
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
