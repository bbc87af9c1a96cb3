"""Structural similarity index.

Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity",
IEEE TIP 2004. https://doi.org/10.1109/TIP.2003.819861
"""
from __future__ import annotations

from numbers import Integral, Real

import torch
import torch.nn.functional as F

from ._checks import check_all

__all__ = ["ssim"]


def _gaussian_window(size: int, sigma: float, device, dtype=torch.float32) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor | None = None,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         reduction: str = "mean") -> torch.Tensor:
    r"""Mean SSIM with a Gaussian window (the paper's and scikit-image's ``gaussian_weights=True`` setting).

    .. math::
        \mathrm{SSIM}(x, y) = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
        {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (k_1 L)^2,\ C_2 = (k_2 L)^2

    Local statistics use a normalised Gaussian window (valid positions only, no padding) and the
    biased (population) covariance; the map is averaged over positions and channels. Computed in
    float32; the window is applied as two separable 1-D passes (the same values as the 2-D window,
    up to float rounding).

    Args:
        pred: predicted images.
        target: reference images.
        data_range: ``L > 0``, the value range, a number or a tensor ``()`` / ``(B,)``; default
            ``target.max() - target.min()`` per sample. A tensor is range-checked like
            :func:`~blockyard.losses.dice_loss`'s target (exact on the CPU, an async assert elsewhere).
        window_size: odd Gaussian window size, at most ``min(H, W)`` (scikit-image's rule; a
            larger window raises a ``ValueError`` rather than silently measuring a smaller one).
        sigma: window standard deviation (> 0).
        k1, k2: stabilising constants.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (one value per sample).

    Shapes:
        - pred, target: ``(B, C, H, W)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred: expected (B, C, H, W) equal to target's {tuple(target.shape)}, "
                         f"got {tuple(pred.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    channels, height, width = pred.shape[1:]
    if isinstance(window_size, bool) or not isinstance(window_size, Integral):
        raise TypeError(f"window_size: expected an odd int, got {window_size!r}")
    if window_size < 1 or window_size % 2 == 0 or window_size > min(height, width):
        raise ValueError(f"window_size: expected an odd int in [1, min(H, W) = {min(height, width)}], "
                         f"got {window_size} for images {tuple(pred.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    if isinstance(data_range, torch.Tensor):
        if data_range.shape not in ((), (pred.shape[0],)):
            raise ValueError(f"data_range: expected a tensor () or ({pred.shape[0]},), got {tuple(data_range.shape)}")
        check_all(data_range > 0, "data_range: expected > 0", lambda: f"{data_range.tolist()}")
    elif data_range is not None and not (isinstance(data_range, Real) and data_range > 0):
        raise ValueError(f"data_range: expected None or a number > 0, got {data_range!r}")
    x, y = pred.float(), target.float()
    size = int(window_size)
    g = _gaussian_window(size, sigma, x.device)
    if data_range is None:
        data_range = (y.amax(dim=(1, 2, 3)) - y.amin(dim=(1, 2, 3))).clamp_min(1e-12)
    rng = torch.as_tensor(data_range, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    # The Gaussian window is the outer product g g^T, so each local mean is two 1-D passes
    # (2k multiplies per pixel instead of k^2), and the five maps go through them together.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    groups = 5 * channels
    maps = F.conv2d(maps, g.view(1, 1, size, 1).expand(groups, 1, size, 1), groups=groups)
    maps = F.conv2d(maps, g.view(1, 1, 1, size).expand(groups, 1, 1, size), groups=groups)
    mu_x, mu_y, exx, eyy, exy = maps.chunk(5, dim=1)
    sxx = exx - mu_x**2
    syy = eyy - mu_y**2
    sxy = exy - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    per_sample = smap.mean(dim=(1, 2, 3))
    return per_sample.mean() if reduction == "mean" else per_sample
