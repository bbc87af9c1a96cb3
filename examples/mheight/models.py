"""The m-height regressors, assembled from blockyard blocks.

Every model maps ``(x, side, key)`` (from :func:`encode`) to a prediction of ``log2(h_m)``,
standardised by the training set's mean and std (the script undoes it). ``P`` is the
zero-padded ``(6, 6)`` parity part of ``G = [I_k | P]`` and ``side`` is ``(n, k, m)``.
:func:`encode` adds a ``log2|P|`` channel (unless ``log_channel=False``) and, with
``scaling="standard"``, scales the channels and the side to O(1) (``scaling="none"`` feeds them
raw, as the seed's best ResNet did), and :func:`augment` draws a random symmetry of the heights
for training. ``in_channels`` of every builder is 2 with the log channel, 1 without.

- ``fcn``: the seed's FCN, ``MLP(2 * 36 + 3 -> 512 -> 256 -> 128 -> 1)`` with dropout 0.3
  (widths and dropout are arguments).
- ``resnet``: ``ResNet2d`` with side parameters (the seed's best is 64 channels x 5 blocks; the
  script's CPU default 32 x 3 is its baseline), its 6x6 map flattened (``pool_size=6``) as in
  the seed.
- ``vit``: ``ViT2d`` with 3x3 patches, 4 layers of width 128, 8 heads (the seed's ViT).
- ``moe``: a mixture of six FCN or ResNet experts gated by ``(n, k)`` only (:class:`MoE`): a hard
  gate (one expert per code shape, the seed's first MoEs), a dense soft gate (its FCN MoE) or a
  sparse top-k gate (its best model: top-2 ResNet experts, each a copy of one trained ResNet),
  optionally with a learned temperature.
- ``binned``: the ResNet as a classifier over bins of log2 h (``mheight.binned.Binned``).
- ``control``: the MoE's same-budget control, no model of its own: the script fine-tunes a copy
  of the trained expert family exactly as it fine-tunes the MoE.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from blockyard.blocks import MLP, KeyGate, MixtureOfExperts, ResNet2d, SoftGate, TopKGate, ViT2d

from .heights import NK

__all__ = ["EXPERTS", "FAMILIES", "GATES", "MODELS", "SCALINGS", "Features", "FlatMLP", "MoE", "Prediction", "augment",
           "build_expert", "build_model", "encode"]

FAMILIES = ("fcn", "resnet", "vit", "moe")  # what build_model builds
MODELS = (*FAMILIES, "control", "binned")  # what --models trains
EXPERTS = ("resnet", "fcn")
GATES = ("hard", "soft", "topk")
SCALINGS = ("standard", "none")
FCN_WIDTHS = (512, 256, 128)
_SIDE_CENTER = (9.5, 5.0, 4.0)
_SIDE_SCALE = (0.5, 1.0, 2.0)


class Features(NamedTuple):
    """A model's input: ``x (B, 2, R, C)``, ``side (B, 3)``, and ``key (B,)``, the code shape's index in ``NK``."""

    x: torch.Tensor
    side: torch.Tensor
    key: torch.Tensor


def encode(matrix: torch.Tensor, side: torch.Tensor, scaling: str = "standard", log_channel: bool = True) -> Features:
    """Raw padded P ``(B, 6, 6)`` and ``(n, k, m)`` ``(B, 3)`` -> the models' :class:`Features`.

    Channel 0 is ``P``, channel 1 ``log2|P|`` (0 on the padding; left out with
    ``log_channel=False``, so ``x`` is ``(B, 1, 6, 6)``: the ablation). Heights are ratios of codeword
    magnitudes, so the log channel turns their multiplicative structure additive: without it a
    32x3 ResNet stayed at the group-mean baseline's validation Log2-MSE (1.36) for 5 epochs; with
    it, it reached 1.28 after 4. ``scaling="standard"`` divides the channels by 100 and 7 (the
    seed's optional ``Normalize(std=100)``) and centres the side; ``"none"`` leaves P (entries
    up to 100), ``log2|P|`` and ``(n, k, m)`` raw, as the seed's best ResNet saw them. ``key`` is
    ``NK.index((n, k))``, for the hard gate.
    """
    if matrix.dim() != 3 or side.dim() != 2 or side.shape[1] != 3 or side.shape[0] != matrix.shape[0]:
        raise ValueError(f"matrix, side: expected (B, K, N) and (B, 3), got {tuple(matrix.shape)} and "
                         f"{tuple(side.shape)}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling: expected one of {SCALINGS}, got {scaling!r}")
    log_mag = torch.where(matrix != 0, torch.log2(matrix.abs().clamp_min(1e-6)), torch.zeros_like(matrix))
    n, k = side[:, 0].round().long(), side[:, 1].round().long()
    key = (n - NK[0][0]) * 3 + (k - NK[0][1])  # NK is n-major over k = 4, 5, 6
    if scaling == "standard":
        matrix, log_mag = matrix / 100.0, log_mag / 7.0
        side = (side - side.new_tensor(_SIDE_CENTER)) / side.new_tensor(_SIDE_SCALE)
    channels = [matrix, log_mag] if log_channel else [matrix]
    return Features(torch.stack(channels, dim=1), side, key)


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
    """``value``: ``(B,)`` standardised log2 h; ``aux_loss``: the gate's balance loss (0 without a gate);
    ``logits``: ``(B, C)`` bin scores of a classifier (``Binned``), None for a regressor."""

    value: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor | None = None


class FlatMLP(nn.Module):
    """The seed's FCN input: ``MLP(cat(flatten(x), side))``; ``(x, side) -> (B, 1)`` like ``ResNet2d``."""

    def __init__(self, in_dim: int, widths: tuple[int, ...] = FCN_WIDTHS, dropout: float = 0.3) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden=widths, out_dim=1, dropout=dropout, act_layer=nn.ReLU)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([x.flatten(1), side], dim=1))


class _Plain(nn.Module):
    """A ``(x, side) -> (B, 1)`` network behind the common ``Prediction`` interface."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, side: torch.Tensor, key: torch.Tensor | None = None) -> Prediction:
        out = self.net(x, side)
        return Prediction(out.squeeze(-1), out.new_zeros((), dtype=torch.float32))


class MoE(nn.Module):
    """Mixture of ``(x, side) -> (B, 1)`` experts gated by the code shape ``(n, k)``.

    - ``gate="hard"``: ``KeyGate``, row of code shape ``NK[i]`` -> expert ``i`` with weight 1 (the
      seed's ``MoE_ResNet`` and ``MoE_FCN``).
    - ``gate="soft"``: ``SoftGate`` (``Linear(2, hidden) -> ReLU -> Linear(hidden, E)``, softmax),
      every expert on every row (the seed's ``MoE_FCN_SoftGate``).
    - ``gate="topk"``: ``TopKGate``, top-``k`` with a softmax over the selected logits (the seed's
      ``MoE_ResNet_SparseGate``); ``learn_temperature`` divides the logits by a learned
      ``T = exp(t)``, 1 at init. Only the selected experts run on a row.

    The learned gates see only the first two side entries. :meth:`from_backbone` copies one
    trained network into every expert (the seed's recipe; the gate breaks the symmetry).
    """

    def __init__(self, experts: list[nn.Module], gate: str = "topk", k: int = 2, learn_temperature: bool = False,
                 gate_hidden: int = 16) -> None:
        super().__init__()
        num = len(experts)
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        if learn_temperature and gate != "topk":
            raise ValueError(f"learn_temperature: only the 'topk' gate has a temperature, got gate={gate!r}")
        if gate == "hard":
            router = KeyGate(len(NK), num)
        elif gate == "soft":
            router = SoftGate(2, num, hidden=gate_hidden)
        else:
            router = TopKGate(2, num, k=k, learn_temperature=learn_temperature, hidden=gate_hidden)
        self.moe = MixtureOfExperts(experts, router)

    @property
    def sparse(self) -> bool:
        """True when some expert skips some row (its parameters may get no gradient on a step)."""
        return not self.moe.gate.dense

    @classmethod
    def from_backbone(cls, backbone: nn.Module, num_experts: int = len(NK), **kwargs) -> MoE:
        """Every expert an independent copy of ``backbone`` (a trained network); ``kwargs`` go to the gate."""
        return cls([copy.deepcopy(backbone) for _ in range(num_experts)], **kwargs)

    def route(self, side: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The gate's ``(B, E)`` weights for these rows."""
        return self.moe.gate(side[:, :2], key=key).weights

    def forward(self, x: torch.Tensor, side: torch.Tensor, key: torch.Tensor | None = None) -> Prediction:
        out = self.moe((x, side), key=key, gate_input=side[:, :2])
        return Prediction(out.output.squeeze(-1), out.aux_loss)


def build_expert(kind: str, base_channels: int = 64, num_blocks: int = 5, fcn_widths: tuple[int, ...] = FCN_WIDTHS,
                 fcn_dropout: float = 0.3, in_channels: int = 2, out_dim: int = 1) -> nn.Module:
    """One ``(x, side) -> (B, out_dim)`` network of :data:`EXPERTS` on ``in_channels`` 6x6 maps."""
    if kind == "fcn":
        return FlatMLP(in_channels * 36 + 3, tuple(fcn_widths), fcn_dropout)
    if kind == "resnet":
        return ResNet2d(in_channels, base_channels, num_blocks, side_dim=3, out_dim=out_dim, pool_size=6)
    raise ValueError(f"kind: expected one of {EXPERTS}, got {kind!r}")


def build_model(name: str, base_channels: int = 64, num_blocks: int = 5, *, fcn_widths: tuple[int, ...] = FCN_WIDTHS,
                fcn_dropout: float = 0.3, experts: str = "resnet", gate: str = "topk", k: int = 2,
                learn_temperature: bool = False, in_channels: int = 2) -> nn.Module:
    """One of :data:`FAMILIES` (``moe``: six freshly initialised ``experts``; see ``MoE.from_backbone``).

    ``binned`` needs bin edges (``mheight.binned.Binned``) and ``control`` a trained model: the script builds them.
    """
    if in_channels not in (1, 2):
        raise ValueError(f"in_channels: expected 1 (P) or 2 (P and log2|P|), got {in_channels!r}")
    sizes = {"base_channels": base_channels, "num_blocks": num_blocks, "fcn_widths": fcn_widths,
             "fcn_dropout": fcn_dropout, "in_channels": in_channels}
    if name in EXPERTS:
        return _Plain(build_expert(name, **sizes))
    if name == "vit":
        return _Plain(ViT2d(in_channels, 3, 128, 4, 8, side_dim=3, out_dim=1, img_size=6, mlp_ratio=2.0,
                            side_hidden=128, act_layer=nn.ReLU))
    if name == "moe":
        return MoE([build_expert(experts, **sizes) for _ in NK], gate=gate, k=k, learn_temperature=learn_temperature)
    raise ValueError(f"name: expected one of {FAMILIES}, got {name!r}")
