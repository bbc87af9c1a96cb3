"""Normalisation layers: LayerNorm2d, ConvNeXt-V2 GRN, LayerScale (GroupNorm: ``group_norm.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masking import _check_spatial_mask

__all__ = ["GRN", "LayerNorm2d", "LayerScale"]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 -> float32; float32 and float64 are kept as they are.
    return torch.promote_types(dtype, torch.float32)


class LayerNorm2d(nn.LayerNorm):
    r"""LayerNorm over the channels of a ``(B, C, H, W)`` map, independently at every position.

    Same numerics as timm's ``LayerNorm2d`` (permute to channels-last, ``F.layer_norm`` over ``C``,
    permute back, ``eps=1e-6``); parameters are named ``weight``/``bias`` like ``nn.LayerNorm``.

    .. math::
        y_{b,:,h,w} = \frac{x_{b,:,h,w} - \mu_{b,h,w}}{\sqrt{\sigma^2_{b,h,w} + \epsilon}}
        \odot w + b

    with the mean and (biased) variance taken over ``C``. This is not ``GroupNorm(1, C)``, which
    normalises over ``C*H*W``. Half-precision inputs are normalised in float32 (also under
    autocast) and the result is cast back to the input dtype.

    Args:
        channels: number of channels ``C``.
        eps: added to the variance.
        affine: learn a per-channel scale ``weight`` (ones) and shift ``bias`` (zeros).

    Shapes:
        - x: ``(B, C, H, W)``
        - output: same as ``x``, same dtype
    """

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        if channels < 1:
            raise ValueError(f"channels: expected >= 1, got {channels}")
        super().__init__(channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over ``C`` at every position.

        Args:
            x: ``(B, C, H, W)``.

        Returns:
            ``(B, C, H, W)``, same dtype as ``x`` (half precision normalised in float32).
        """
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected (B, {self.channels}, H, W), got {tuple(x.shape)}")
        compute = _stats_dtype(x.dtype)
        weight = None if self.weight is None else self.weight.to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        # One explicit channels-last copy (none for channels_last input; for half precision the
        # same pass casts). Handing layer_norm the permuted view instead costs a third transpose:
        # it copies the view in the forward and again in the backward, from the view it saved.
        # (Tensor.to returns self when only memory_format differs, hence .contiguous here.)
        xc = (x.contiguous(memory_format=torch.channels_last) if x.dtype == compute
              else x.to(dtype=compute, memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        y = F.layer_norm(xc, (self.channels,), weight, bias, self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, eps={self.eps}, affine={self.elementwise_affine}"


class GRN(nn.Module):
    r"""Global response normalisation of ConvNeXt-V2, the identity at init.

    Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders",
    CVPR 2023. https://arxiv.org/abs/2301.00808

    .. math::
        G_{b,c} = \lVert x_{b,c,:,:} \rVert_2, \qquad
        N_{b,c} = \frac{G_{b,c}}{\operatorname{mean}_c G_{b,c} + \epsilon}, \qquad
        y = x + \beta + \gamma \odot (x \odot N)

    ``eps`` is added to the channel mean (the denominator), as in the official code and timm.
    ``gamma`` and ``beta`` are per-channel and zero-initialised, so ``y == x`` exactly at init.
    Statistics are per sample (the dense GRN, not the batch-pooled sparse ``MinkowskiGRN``) and
    are computed in float32 for half-precision inputs (the sum of squares overflows float16);
    the output is cast back to the input dtype.

    Masking: ``mask`` is boolean with **True = masked** (hidden). ``G`` is then the L2 norm over
    the visible positions only (masked positions contribute zero), so values at masked positions
    never change the output at visible positions. The formula is still applied at masked
    positions (there ``y`` depends on their own values and on ``beta``); callers that need zeros
    there (FCMAE) multiply by ``~mask`` afterwards. A sample with every position masked gets
    ``N = 0``, so ``y = x + beta``.

    Computation: by default (``fused=True``) the gate is folded into one per-channel factor,
    ``y = x * (1 + gamma * N) + beta`` (one ``addcmul`` over ``x`` instead of three passes, and
    fewer in the backward; equal to the formula up to float rounding and exactly ``x`` at init).
    ``fused=False`` computes the formula term by term (the reference path).

    Args:
        channels: number of channels ``C``.
        eps: added to the channel mean of ``G``.
        channels_last: the input is ``(B, H, W, C)`` (after a permute, as in ConvNeXt blocks)
            instead of ``(B, C, H, W)``.
        fused: one ``addcmul`` with a per-channel factor; ``False`` runs the reference formula.
            A plain attribute, may be flipped after construction.

    Shapes:
        - x: ``(B, C, H, W)``, or ``(B, H, W, C)`` if ``channels_last``
        - mask: ``(B, H, W)`` or ``(B, 1, H, W)`` bool, True = masked (either layout)
        - output: same as ``x``, same dtype
    """

    def __init__(self, channels: int, eps: float = 1e-6, channels_last: bool = False, fused: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels: expected >= 1, got {channels}")
        self.channels = channels
        self.eps = eps
        self.channels_last = channels_last
        self.fused = fused
        self.gamma = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma)
        nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise each channel by its spatial L2 norm relative to the channel mean, then gate.

        Args:
            x: ``(B, C, H, W)``, or ``(B, H, W, C)`` if ``channels_last``.
            mask: optional ``(B, H, W)`` or ``(B, 1, H, W)`` bool, True = masked: ``G`` is taken over
                the visible positions only.

        Returns:
            ``x + beta + gamma * (x * N)``, same shape and dtype as ``x`` (statistics in float32).
        """
        c = self.channels
        if self.channels_last:
            if x.dim() != 4 or x.shape[-1] != c:
                raise ValueError(f"x: expected (B, H, W, {c}), got {tuple(x.shape)}")
            batch, height, width = x.shape[0], x.shape[1], x.shape[2]
            spatial, chan, param_shape = (1, 2), -1, (c,)
        else:
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"x: expected (B, {c}, H, W), got {tuple(x.shape)}")
            batch, height, width = x.shape[0], x.shape[2], x.shape[3]
            spatial, chan, param_shape = (2, 3), 1, (c, 1, 1)
        if mask is not None:
            mask = _check_spatial_mask(mask, batch, height, width)
            if self.channels_last:
                mask = mask.reshape(batch, height, width, 1)

        xf = x.to(_stats_dtype(x.dtype))
        visible = xf if mask is None else xf.masked_fill(mask, 0.0)
        gx = torch.linalg.vector_norm(visible, ord=2, dim=spatial, keepdim=True)
        nx = gx / (gx.mean(dim=chan, keepdim=True) + self.eps)
        gamma = self.gamma.to(xf.dtype).view(param_shape)
        beta = self.beta.to(xf.dtype).view(param_shape)
        if self.fused:  # N is per (sample, channel): fold the gate into one factor
            return torch.addcmul(beta, xf, 1 + gamma * nx).to(x.dtype)
        return (xf + beta + gamma * (xf * nx)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, eps={self.eps}, channels_last={self.channels_last}, fused={self.fused}"


class LayerScale(nn.Module):
    r"""Learned per-channel scale on dim 1, initialised small so a residual branch starts near zero.

    Touvron et al., "Going deeper with Image Transformers" (CaiT), ICCV 2021.
    https://arxiv.org/abs/2103.17239

    .. math::
        y_{b,c,\dots} = \gamma_c \, x_{b,c,\dots}, \qquad \gamma \leftarrow \text{init}

    Args:
        channels: number of channels ``C`` (dim 1 of the input).
        init: initial value of every ``gamma_c``.

    Shapes:
        - x: ``(B, C, *)`` with any number (0 included) of trailing dims; for tokens ``(B, N, C)``
          permute first or scale on the last dim yourself
        - output: same as ``x``, same dtype
    """

    def __init__(self, channels: int, init: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels: expected >= 1, got {channels}")
        self.channels = channels
        self.init = init
        self.gamma = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale channel ``c`` (dim 1) by ``gamma_c``.

        Args:
            x: ``(B, C, *)``.

        Returns:
            ``gamma * x``, same shape and dtype as ``x``.
        """
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected (B, {self.channels}, *), got {tuple(x.shape)}")
        return x * self.gamma.to(x.dtype).view(self.channels, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, init={self.init}"
