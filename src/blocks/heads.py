"""Output heads: a convolutional refinement head for dense maps, a dense MLP, and an MLP head with side inputs."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .group_norm import group_norm

__all__ = ["MLP", "ConvHead", "SideHead"]


def _widths(hidden: int | Sequence[int] | None, count: int, default: list[int], name: str) -> list[int]:
    if hidden is None:
        widths = default
    elif isinstance(hidden, int):
        widths = [hidden] * count
    else:
        widths = [int(h) for h in hidden]
        if len(widths) != count:
            raise ValueError(f"{name}: expected {count} widths, got {len(widths)} ({tuple(widths)})")
    if any(w < 1 for w in widths):
        raise ValueError(f"{name}: widths must be >= 1, got {tuple(widths)}")
    return widths


def _place(module: nn.Module, device, dtype) -> nn.Module:
    # norm_layer callables need not accept device/dtype, so move after construction
    return module.to(device=device, dtype=dtype) if device is not None or dtype is not None else module


class ConvHead(nn.Module):
    r"""Refinement head for dense predictions: ``(depth-1) x [3x3 conv, norm, act]`` then a 1x1 conv.

    .. math::
        y = W_{1\times1} * \big(\mathrm{act}(\mathrm{GN}(W_{3\times3}^{(d-1)} * \cdots
            \mathrm{act}(\mathrm{GN}(W_{3\times3}^{(1)} * x))))\big)

    depth 3: 3x3 -> 3x3 -> 1x1; depth 2: 3x3 -> 1x1; depth 1: a single 1x1 conv. The 3x3 convs
    have no bias (the norm that follows would cancel it); the final 1x1 conv has one.

    Default widths follow the seed's heads: ``in_channels`` for the first hidden layer, then
    halved at each further layer (``in_channels // 2**i``, at least 1), so ``ConvHead(48, 4)``
    is 48 -> 48 -> 24 -> 4 and ``ConvHead(48, 12, depth=2)`` is 48 -> 48 -> 12.

    Args:
        in_channels: input channels ``C``.
        out_channels: output channels ``K`` (logits, no activation).
        hidden: width of the hidden layers: ``None`` (default above), an ``int`` for all of them,
            or a sequence of ``depth - 1`` ints.
        depth: number of conv layers, ``>= 1``.
        act_layer: activation; default ``nn.LeakyReLU`` (slope 0.01, as in the seed).
        norm_layer: called as ``norm_layer(width)``; default :func:`group_norm` (<= 8 groups,
            never crashes on awkward widths).

    Shapes:
        - x: ``(B, C, H, W)``
        - output: ``(B, K, H, W)``
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int | Sequence[int] | None = None,
                 depth: int = 3, act_layer: Callable[[], nn.Module] = nn.LeakyReLU,
                 norm_layer: Callable[[int], nn.Module] = group_norm, device=None, dtype=None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: expected >= 1, got {depth}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        default = [max(1, in_channels // 2**i) for i in range(depth - 1)]
        self.widths = _widths(hidden, depth - 1, default, "hidden")
        layers: list[nn.Module] = []
        width = in_channels
        for w in self.widths:
            layers += [nn.Conv2d(width, w, 3, padding=1, bias=False, device=device, dtype=dtype),
                       _place(norm_layer(w), device, dtype), act_layer()]
            width = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_channels, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refine a feature map into ``K`` output channels (logits, no final activation).

        Args:
            x: ``(B, C, H, W)``.

        Returns:
            ``(B, K, H, W)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.out(self.body(x))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, widths={self.widths}"


class MLP(nn.Module):
    r"""Dense network on the last dimension: ``[Linear, norm?, act, dropout?]`` per hidden width, then Linear.

    .. math::
        h_0 = x, \quad h_{i} = \mathrm{drop}(\mathrm{act}(\mathrm{norm}(W_i h_{i-1} + b_i))), \quad
        y = W_{out} h_n + b_{out}

    Args:
        in_dim: input features.
        hidden: hidden widths, an ``int`` (one layer) or a sequence (``()`` = a single Linear).
        out_dim: output features.
        dropout: dropout after each hidden activation (training only); none is added when 0.
        act_layer: activation.
        norm_layer: optional, called as ``norm_layer(width)`` after each hidden Linear
            (e.g. ``nn.LayerNorm``).

    Shapes:
        - x: ``(..., in_dim)``
        - output: ``(..., out_dim)``
    """

    def __init__(self, in_dim: int, hidden: int | Sequence[int] = (512, 256, 128), out_dim: int = 1,
                 dropout: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        widths = [hidden] if isinstance(hidden, int) else [int(h) for h in hidden]
        self.widths = _widths(widths, len(widths), widths, "hidden")
        layers: list[nn.Module] = []
        width = in_dim
        for w in self.widths:
            layers.append(nn.Linear(width, w, device=device, dtype=dtype))
            if norm_layer is not None:
                layers.append(_place(norm_layer(w), device, dtype))
            layers.append(act_layer())
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            width = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the dense network on the last dimension.

        Args:
            x: ``(..., in_dim)``.

        Returns:
            ``(..., out_dim)``.
        """
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x: expected (..., {self.in_dim}), got {tuple(x.shape)}")
        return self.out(self.body(x))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, widths={self.widths}, out_dim={self.out_dim}"


class SideHead(nn.Module):
    r"""MLP head on pooled features joined with a projection of optional side parameters.

    System A's models (seed research A5) feed side parameters (e.g. ``(n, k, m)``) this way:

    .. math::
        s = \mathrm{act}(W_s\, \mathrm{side} + b_s), \qquad
        y = \mathrm{MLP}(\mathrm{norm}([f, s]))

    With ``side_dim=0`` there is no projection and ``y = MLP(norm(f))``; ``norm`` is the identity
    unless ``norm_layer`` is given. ``side`` is cast to the dtype of ``f`` before the projection.

    Args:
        in_dim: width of the pooled features ``f``.
        side_dim: size of the side-parameter vector; 0 = none (then ``side`` must be None).
        out_dim: output features.
        side_hidden: width of the side projection ``s``.
        hidden: hidden widths of the :class:`MLP` (``()`` = a single Linear).
        dropout: dropout after each hidden activation of the MLP.
        act_layer: activation of the side projection and the MLP.
        norm_layer: optional, called as ``norm_layer(in_dim + side_hidden)`` (``in_dim`` when
            ``side_dim=0``) on the joined features before the MLP (e.g. ``nn.LayerNorm``).

    Shapes:
        - features: ``(B, in_dim)``
        - side: ``(B, side_dim)``, required iff ``side_dim > 0``
        - output: ``(B, out_dim)``
    """

    def __init__(self, in_dim: int, side_dim: int = 0, out_dim: int = 1, side_hidden: int = 64,
                 hidden: int | Sequence[int] = (256,), dropout: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.ReLU,
                 norm_layer: Callable[[int], nn.Module] | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if in_dim < 1 or side_dim < 0:
            raise ValueError(f"in_dim, side_dim: expected >= 1, >= 0, got {in_dim}, {side_dim}")
        self.in_dim = in_dim
        self.side_dim = side_dim
        self.side = (nn.Sequential(nn.Linear(side_dim, side_hidden, device=device, dtype=dtype), act_layer())
                     if side_dim > 0 else None)
        features = in_dim + (side_hidden if side_dim > 0 else 0)
        self.norm = nn.Identity() if norm_layer is None else _place(norm_layer(features), device, dtype)
        self.mlp = MLP(features, hidden=hidden, out_dim=out_dim, dropout=dropout, act_layer=act_layer,
                       device=device, dtype=dtype)

    def check_side(self, side: torch.Tensor | None, batch: int) -> None:
        """Raise unless ``side`` fits this head for a batch of ``batch`` (models call it up front)."""
        if self.side is None:
            if side is not None:
                raise ValueError(f"side: this model was built with side_dim=0, got {tuple(side.shape)}")
        elif side is None or side.shape != (batch, self.side_dim):
            got = None if side is None else tuple(side.shape)
            raise ValueError(f"side: expected ({batch}, {self.side_dim}), got {got}")

    def forward(self, features: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Join pooled features with the projected side parameters and apply the MLP.

        Args:
            features: ``(B, in_dim)`` pooled features.
            side: ``(B, side_dim)`` side parameters, required iff ``side_dim > 0`` (else None).

        Returns:
            ``(B, out_dim)``.
        """
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features: expected (B, {self.in_dim}), got {tuple(features.shape)}")
        self.check_side(side, features.shape[0])
        if self.side is not None:
            features = torch.cat([features, self.side(side.to(features.dtype))], dim=1)
        return self.mlp(self.norm(features))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, side_dim={self.side_dim}"
