"""The m-height regressors, assembled from blockyard blocks.

Every model maps ``(P, side)`` to a prediction of ``log2(h_m)``, standardised by the training
set's mean and std (the script undoes it). ``P`` is the zero-padded ``(6, 6)`` parity part of
``G = [I_k | P]`` and ``side`` is ``(n, k, m)``. :func:`encode` scales both to O(1) and adds a
``log2|P|`` channel (the seed fed raw ``P``, entries up to 100, and raw ``(n, k, m)``), and
:func:`augment` draws a random symmetry of the heights for training.

- ``fcn``: the seed's FCN, ``MLP(2 * 36 + 3 -> 512 -> 256 -> 128 -> 1)`` with dropout 0.3.
- ``resnet``: ``ResNet2d`` with side parameters (the seed's best is 64 channels x 5 blocks; the
  script's CPU default 32 x 3 is its baseline), its 6x6 map flattened (``pool_size=6``) as in
  the seed.
- ``vit``: ``ViT2d`` with 3x3 patches, 4 layers of width 128, 8 heads (the seed's ViT).
- ``moe``: the seed's best model: a sparse top-2 mixture of ResNet experts, every expert a copy
  of one trained ResNet, gated by ``(n, k)`` only (:class:`ResNetMoE`).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from blockyard.blocks import MLP, MixtureOfExperts, ResNet2d, TopKGate, ViT2d

__all__ = ["MODELS", "Prediction", "ResNetMoE", "augment", "build_model", "encode"]

MODELS = ("fcn", "resnet", "vit", "moe")
_SIDE_CENTER = (9.5, 5.0, 4.0)
_SIDE_SCALE = (0.5, 1.0, 2.0)


def encode(matrix: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw padded P ``(B, 6, 6)`` and ``(n, k, m)`` ``(B, 3)`` -> ``(B, 2, 6, 6)`` features and a centred side.

    Channel 0 is ``P / 100``; channel 1 is ``log2|P| / 7`` (0 on the padding). Heights are ratios
    of codeword magnitudes, so the log channel turns their multiplicative structure additive:
    without it a 32x3 ResNet stayed at the group-mean baseline's validation Log2-MSE (1.36) for
    5 epochs; with it, it reached 1.28 after 4.
    """
    if matrix.dim() != 3 or side.dim() != 2 or side.shape[1] != 3 or side.shape[0] != matrix.shape[0]:
        raise ValueError(f"matrix, side: expected (B, K, N) and (B, 3), got {tuple(matrix.shape)} and "
                         f"{tuple(side.shape)}")
    log_mag = torch.where(matrix != 0, torch.log2(matrix.abs().clamp_min(1e-6)) / 7.0, torch.zeros_like(matrix))
    center = side.new_tensor(_SIDE_CENTER)
    scale = side.new_tensor(_SIDE_SCALE)
    return torch.stack([matrix / 100.0, log_mag], dim=1), (side - center) / scale


def augment(matrix: torch.Tensor, shape: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a random symmetry of the m-height to each padded P: the target does not change.

    Permuting the rows of ``P`` (the systematic coordinates, after re-sorting ``[I | P]``'s
    identity part), permuting its columns, and negating rows or columns only permute or negate
    codeword coordinates, so every ``h_m`` is unchanged. One draw per sample, vectorised: the
    padding rows/columns sort last and stay zero.

    Shapes:
        - matrix: ``(B, R, C)`` zero-padded P (any scale); shape: ``(B, 2)`` true ``(k, n - k)``
        - output: ``(B, R, C)``
    """
    batch, rows, cols = matrix.shape
    if shape.shape != (batch, 2):
        raise ValueError(f"shape: expected ({batch}, 2), got {tuple(shape.shape)}")
    dev = matrix.device

    def perm(size: int, valid: torch.Tensor) -> torch.Tensor:
        keys = torch.rand(batch, size, generator=generator).to(dev)
        return keys.masked_fill(torch.arange(size, device=dev) >= valid[:, None], 2.0).argsort(1)

    def signs(size: int) -> torch.Tensor:
        return (torch.randint(0, 2, (batch, size), generator=generator) * 2 - 1).to(dev, matrix.dtype)

    pr, pc = perm(rows, shape[:, 0].to(dev)), perm(cols, shape[:, 1].to(dev))
    out = matrix.gather(1, pr[:, :, None].expand(-1, -1, cols)).gather(2, pc[:, None, :].expand(-1, rows, -1))
    return out * signs(rows)[:, :, None] * signs(cols)[:, None, :]


class Prediction(NamedTuple):
    """``value``: ``(B,)`` standardised log2 h; ``aux_loss``: the gate's balance loss (0 without a gate)."""

    value: torch.Tensor
    aux_loss: torch.Tensor


class _Plain(nn.Module):
    """A ``(x, side) -> (B, 1)`` network behind the common ``Prediction`` interface."""

    def __init__(self, net: nn.Module, flatten: bool = False) -> None:
        super().__init__()
        self.net = net
        self.flatten = flatten

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> Prediction:
        out = self.net(torch.cat([x.flatten(1), side], dim=1)) if self.flatten else self.net(x, side)
        return Prediction(out.squeeze(-1), out.new_zeros((), dtype=torch.float32))


class ResNetMoE(nn.Module):
    """Sparse top-k mixture of ``ResNet2d`` experts gated by the code shape ``(n, k)``.

    The gate (``TopKGate``: ``Linear(2, hidden) -> ReLU -> Linear(hidden, E)``, top-k, softmax over
    the selected logits) sees only the first two side entries, as in the seed's
    ``MoE_ResNet_SparseGate``; each expert sees ``(x, side)``. Only the selected experts run on a
    row. :meth:`from_backbone` copies one trained ResNet into every expert (the seed's best recipe;
    the gate breaks the symmetry during fine-tuning).
    """

    def __init__(self, experts: list[nn.Module], k: int = 2, gate_hidden: int = 16) -> None:
        super().__init__()
        self.moe = MixtureOfExperts(experts, TopKGate(2, len(experts), k=k, hidden=gate_hidden))

    @classmethod
    def from_backbone(cls, backbone: nn.Module, num_experts: int = 6, k: int = 2,
                      gate_hidden: int = 16) -> ResNetMoE:
        """Every expert an independent copy of ``backbone`` (a trained ``ResNet2d``)."""
        return cls([copy.deepcopy(backbone) for _ in range(num_experts)], k=k, gate_hidden=gate_hidden)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> Prediction:
        out = self.moe((x, side), gate_input=side[:, :2])
        return Prediction(out.output.squeeze(-1), out.aux_loss)


def _resnet(base_channels: int, num_blocks: int) -> ResNet2d:
    return ResNet2d(2, base_channels, num_blocks, side_dim=3, out_dim=1, pool_size=6)


def build_model(name: str, base_channels: int = 64, num_blocks: int = 5) -> nn.Module:
    """One of :data:`MODELS` (``"moe"``: experts freshly initialised; see ``ResNetMoE.from_backbone``)."""
    if name == "fcn":
        return _Plain(MLP(2 * 36 + 3, hidden=(512, 256, 128), out_dim=1, dropout=0.3, act_layer=nn.ReLU),
                      flatten=True)
    if name == "resnet":
        return _Plain(_resnet(base_channels, num_blocks))
    if name == "vit":
        return _Plain(ViT2d(2, 3, 128, 4, 8, side_dim=3, out_dim=1, img_size=6, mlp_ratio=2.0, side_hidden=128,
                            act_layer=nn.ReLU))
    if name == "moe":
        return ResNetMoE([_resnet(base_channels, num_blocks) for _ in range(6)])
    raise ValueError(f"name: expected one of {MODELS}, got {name!r}")
