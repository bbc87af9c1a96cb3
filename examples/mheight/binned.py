"""The m-height example's classifier: log2 h regression reformulated as classification over bins.

The seed's ``ClassifWrapper`` (its Attempt 1): Freedman-Diaconis bins of log2 h, cross-entropy on
the bin index, each class decoded to the midpoint of its bin in log space. The seed binned all its
rows, validation included; here the edges come from the training split alone
(:func:`bin_edges`), in the standardised units the regressors predict, so every model's value
goes through the same ``* std + mean``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from blockyard.data import bin_index, freedman_diaconis_edges

from .models import Prediction, build_expert

__all__ = ["DECODES", "Binned", "bin_edges", "build_binned"]

DECODES = ("argmax", "mean")


def bin_edges(log2h: torch.Tensor, mean: float, std: float, max_bins: int | None = None) -> torch.Tensor:
    """Freedman-Diaconis edges of the training ``log2h`` (``blockyard.data``), standardised: ``(e - mean) / std``.

    Shapes:
        - log2h: ``(N,)``
        - output: ``(C + 1,)`` float64, strictly increasing
    """
    return (freedman_diaconis_edges(log2h, max_bins=max_bins) - mean) / std


class Binned(nn.Module):
    r"""A ``(x, side) -> (B, C)`` network scoring ``C`` bins of the standardised target ``z``.

    .. math::
        \mathrm{label}(z) = \mathrm{clip}(\mathrm{digitize}(z, e) - 1, 0, C - 1), \qquad
        c_i = (e_i + e_{i+1}) / 2, \qquad \mathcal{L} = \mathrm{CE}(\mathrm{logits}, \mathrm{label}(z))

    and the predicted value is :math:`c_{\arg\max}` (``decode="argmax"``, the seed's midpoint
    decoding) or :math:`\sum_i \mathrm{softmax}(\mathrm{logits})_i\, c_i` (``decode="mean"``, the
    posterior mean, which minimises the expected squared error under the model's own belief).
    Labels use ``blockyard.data.bin_index``: a value outside the edges goes to the first or last bin.

    Args:
        net: ``(x, side) -> (B, C)`` with ``C = len(edges) - 1``.
        edges: ``(C + 1,)`` increasing edges in ``z`` units (:func:`bin_edges`), kept as a float32 buffer.
        decode: ``"argmax"`` or ``"mean"``.

    Shapes:
        - x: ``(B, in_channels, 6, 6)``, side: ``(B, 3)``
        - output: ``Prediction(value (B,), aux_loss (), logits (B, C))``, logits in float32
    """

    def __init__(self, net: nn.Module, edges: torch.Tensor, decode: str = "argmax") -> None:
        super().__init__()
        if decode not in DECODES:
            raise ValueError(f"decode: expected one of {DECODES}, got {decode!r}")
        edges = torch.as_tensor(edges, dtype=torch.float32)
        if edges.dim() != 1 or edges.numel() < 3 or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(f"edges: expected (C + 1,) strictly increasing with C >= 2, got {tuple(edges.shape)}")
        self.net = net
        self.decode = decode
        self.register_buffer("edges", edges)
        self.register_buffer("centers", (edges[:-1] + edges[1:]) / 2)

    @property
    def num_bins(self) -> int:
        return self.centers.numel()

    def labels(self, z: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int64 bin of each standardised target."""
        return bin_index(z, self.edges)

    def loss(self, pred: Prediction, z: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``pred.logits`` against the bins of ``z`` (mean over the batch)."""
        return F.cross_entropy(pred.logits, self.labels(z))

    def forward(self, x: torch.Tensor, side: torch.Tensor, key: torch.Tensor | None = None) -> Prediction:
        logits = self.net(x, side).float()
        if logits.shape[-1] != self.num_bins:
            raise ValueError(f"net: expected {self.num_bins} bin scores per row, got {tuple(logits.shape)}")
        if self.decode == "argmax":
            value = self.centers[logits.argmax(-1)]
        else:
            value = logits.softmax(-1) @ self.centers
        return Prediction(value, logits.new_zeros(()), logits)

    def extra_repr(self) -> str:
        return f"bins={self.num_bins}, decode={self.decode!r}"


def build_binned(edges: torch.Tensor, base_channels: int = 64, num_blocks: int = 5, in_channels: int = 2,
                 decode: str = "argmax") -> Binned:
    """The ResNet of ``build_model("resnet")`` with one output per bin, as a :class:`Binned` classifier."""
    net = build_expert("resnet", base_channels, num_blocks, in_channels=in_channels, out_dim=len(edges) - 1)
    return Binned(net, edges, decode)
