"""Fourier layer of the Fourier Neural Operator.

Li et al., "Fourier Neural Operator for Parametric Partial Differential Equations", ICLR 2021.
https://arxiv.org/abs/2010.08895
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import nn

from ._checks import positive_int

__all__ = ["SpectralConv2d"]

_MATMUL_DFT_MAX_MODES = 32  # beyond this many kept columns the FFT does fewer operations


def _complex_mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``einsum("bixy,ioxy->boxy")`` of complex ``x`` and real-stored ``weight (..., 2)`` as ONE real
    batched matmul per mode, ``[x_r, x_i] @ [[w_r, w_i], [-w_i, w_r]]``: torch's complex einsum on
    the CPU falls back to a per-batch loop of copies that costs more than the FFTs."""
    batch, cin, rows, cols = x.shape
    cout = weight.shape[1]
    modes = rows * cols
    xr = torch.view_as_real(x).permute(2, 3, 0, 4, 1).reshape(modes, batch, 2 * cin)
    wr, wi = (weight[..., k].permute(2, 3, 0, 1).reshape(modes, cin, cout) for k in (0, 1))
    block = torch.cat([torch.cat([wr, wi], dim=2), torch.cat([-wi, wr], dim=2)], dim=1)
    y = torch.bmm(xr, block).view(rows, cols, batch, 2, cout)
    return torch.view_as_complex(y.permute(2, 4, 0, 1, 3).contiguous())


def _width_dft(width: int, m2: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m2`` kept horizontal DFT columns as real matrices (built in float64, used in float32).

    ``forward (W, 2*m2)``: ``x @ forward = [Re | Im]`` of ``rfft(x, norm="forward")[..., :m2]``.
    ``inverse (2*m2, W)``: ``[Re | Im] @ inverse = irfft(X, n=W, norm="forward")`` of a spectrum that
    is zero beyond ``m2``: Hermitian weights 1 for the DC (and the Nyquist) column, 2 for the others.
    """
    k = torch.arange(m2, device=device, dtype=torch.float64)
    angle = (2 * math.pi / width) * torch.outer(torch.arange(width, device=device, dtype=torch.float64), k)
    cos, sin = torch.cos(angle), torch.sin(angle)
    forward = torch.cat([cos, -sin], dim=1) / width
    weight = torch.full((m2, 1), 2.0, device=device, dtype=torch.float64)
    weight[0] = 1.0
    if width % 2 == 0 and m2 - 1 == width // 2:
        weight[-1] = 1.0
    inverse = torch.cat([weight * cos.t(), -weight * sin.t()], dim=0)
    return forward.float(), inverse.float()


def _pair(modes: int | tuple[int, int]) -> tuple[int, int]:
    def is_int(v) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool)

    if is_int(modes):
        m = (modes, modes)
    elif isinstance(modes, (tuple, list)) and all(is_int(v) for v in modes):
        m = tuple(modes)
    else:
        raise TypeError(f"modes: expected a positive int or a pair of them, got {modes!r}")
    if len(m) != 2 or any(v < 1 for v in m):
        raise ValueError(f"modes: expected a positive int or a pair of them, got {modes!r}")
    return int(m[0]), int(m[1])


class SpectralConv2d(nn.Module):
    r"""Truncated Fourier-space channel mixing, resolution-independent.

    .. math::
        y = \mathcal{F}^{-1}\big(R \cdot (\mathcal{F} x)\big), \qquad
        (R \cdot \hat x)_o(k_y, k_x) = \sum_i R_{io}(k_y, k_x)\, \hat x_i(k_y, k_x)

    for the kept frequencies :math:`k_y \in \{-m_1, \dots, -1, 0, \dots, m_1 - 1\}` (the ``m1``
    lowest non-negative AND the ``m1`` lowest negative vertical frequencies) and
    :math:`k_x \in \{0, \dots, m_2 - 1\}` (``rfft2`` keeps only non-negative horizontal ones, the
    rest follow by Hermitian symmetry); every other frequency is zeroed. Keeping only the
    non-negative vertical corner (the PtychoPINN fallback's bug) drops half the low-frequency
    content of oblique structure.

    The FFTs use ``norm="forward"``: :math:`\hat x` are Fourier-series coefficients, so the same
    layer applied to the same band-limited function sampled at 32 or at 64 pixels returns the
    same function. They run in float32 even under autocast (half-precision FFTs are limited to
    powers of two and lose accuracy); the result is cast back to the input dtype. Modes are
    clamped per call to what the input allows (``m1 <= H // 2``, ``m2 <= W // 2 + 1``).

    The complex weights are stored as a real tensor ``(in, out, 2 * m1, m2, 2)`` (real and
    imaginary parts last): NCCL rejects complex tensors and DDP has dropped the imaginary part
    of complex gradients. Rows ``0..m1-1`` hold frequencies ``0..m1-1``, rows ``m1..2*m1-1``
    frequencies ``-m1..-1``. Init: complex normal with variance ``2 / (in + out)``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        modes: ``m`` or ``(m1, m2)``, the vertical and horizontal mode counts.
        bias: add a learned per-channel bias after the inverse FFT.
        matmul_dft: along W, transform only the kept columns, as a matmul with their DFT basis (used
            while ``m2 <= 32``: cheaper than a full ``rfft`` then a slice, and than a zero-padded
            ``irfft``); ``False`` always uses ``rfft``/``irfft`` (the reference path; the same values up
            to float rounding). A plain attribute, may be flipped after construction.

    Shapes:
        - x: ``(B, in_channels, H, W)``, real floating point (integer and complex input raise a
          ``TypeError``); ``B = 0`` gives an empty output
        - output: ``(B, out_channels, H, W)``, dtype of ``x``
    """

    def __init__(self, in_channels: int, out_channels: int, modes: int | tuple[int, int] = 12,
                 bias: bool = False, matmul_dft: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.matmul_dft = matmul_dft
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.modes = _pair(modes)
        m1, m2 = self.modes
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, 2 * m1, m2, 2,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Complex normal of total variance 2 / (in + out): each of the two parts gets half.
        nn.init.normal_(self.weight, std=math.sqrt(1.0 / (self.in_channels + self.out_channels)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def effective_modes(self, height: int, width: int) -> tuple[int, int]:
        """The ``(m1, m2)`` actually used on an ``H x W`` input."""
        return min(self.modes[0], height // 2), min(self.modes[1], width // 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the channels of the kept Fourier modes (in float32) and transform back.

        Args:
            x: ``(B, in_channels, H, W)``, real floating point; ``B = 0`` gives an empty output.

        Returns:
            ``(B, out_channels, H, W)``, dtype of ``x``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():  # int input would come back as truncated int garbage
            raise TypeError(f"x: expected a real floating-point tensor, got {x.dtype}")
        height, width = x.shape[-2:]
        m1, m2 = self.effective_modes(height, width)
        if m1 < 1 or width < 1:
            raise ValueError(f"x: expected H >= 2 and W >= 1 to keep any mode, got {tuple(x.shape)}")
        if x.shape[0] == 0:  # the FFT backends reject empty batches (MKL: "Inconsistent configuration")
            out = x.new_zeros(0, self.out_channels, height, width)
            return out if self.bias is None else out + self.bias.to(x.dtype)[:, None, None]
        full = self.modes[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            # rfft2 / irfft2 split by axis, so only the m2 kept columns are transformed along H
            # and the inverse never materialises the full zero-filled spectrum. Along W, with few
            # modes, the kept columns are one matmul with their DFT basis each way (no slice of a
            # full rfft whose backward zero-fills it, no padded irfft).
            use_matmul = self.matmul_dft and m2 <= _MATMUL_DFT_MAX_MODES
            if use_matmul:
                dft, idft = _width_dft(width, m2, x.device)
                z = x.float() @ dft
                xf = torch.complex(z[..., :m2], z[..., m2:])
            else:
                xf = torch.fft.rfft(x.float(), dim=-1, norm="forward")[..., :m2].contiguous()
            xf = torch.fft.fft(xf, dim=-2, norm="forward")
            kept = torch.cat([xf[:, :, :m1], xf[:, :, height - m1:]], dim=2)
            w = self.weight.float()
            w = torch.cat([w[:, :, :m1, :m2], w[:, :, 2 * full - m1:, :m2]], dim=2)
            mixed = _complex_mix(kept, w)  # (B, out, 2 * m1, m2)
            gap = mixed.new_zeros(x.shape[0], self.out_channels, height - 2 * m1, m2)
            spectrum = torch.cat([mixed[:, :, :m1], gap, mixed[:, :, m1:]], dim=2)
            spectrum = torch.fft.ifft(spectrum, dim=-2, norm="forward")
            if use_matmul:
                y = torch.cat([spectrum.real, spectrum.imag], dim=-1) @ idft
            else:
                y = torch.fft.irfft(spectrum, n=width, dim=-1, norm="forward")
            if self.bias is not None:
                y = y + self.bias.float()[:, None, None]
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, modes={self.modes}, "
                f"bias={self.bias is not None}")
