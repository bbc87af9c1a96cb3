"""Frechet distance between two sets of feature vectors (the formula of FID, any feature extractor).

The design decoder's samples are compared with real designs in the trained encoder's feature
space (``features.encoder_features``), so the number is a "Frechet encoder distance": the FID
formula with our own encoder in place of Inception (no downloaded weights), comparable only with
itself.
"""
from __future__ import annotations

import torch

__all__ = ["frechet_distance", "gaussian_stats"]


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``features (N, D)``, in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected (N, D) with N >= 2, got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""Frechet distance of the Gaussians fitted to two feature sets.

    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", NeurIPS 2017 (FID). https://arxiv.org/abs/1706.08500

    .. math:: d^2 = \|\mu_a - \mu_b\|^2 + \mathrm{tr}\,\Sigma_a + \mathrm{tr}\,\Sigma_b
              - 2\,\mathrm{tr}\,(\Sigma_a \Sigma_b)^{1/2}

    with :math:`\mathrm{tr}(\Sigma_a\Sigma_b)^{1/2} = \mathrm{tr}(\Sigma_a^{1/2}\Sigma_b\Sigma_a^{1/2})^{1/2}`
    (the same eigenvalues, but a symmetric PSD matrix: its square root needs only ``eigh``, so
    a rank-deficient covariance, fewer samples than dimensions, is handled exactly). float64.

    Shapes:
        - a: ``(N_a, D)``; b: ``(N_b, D)``
        - output: a Python float, :math:`d^2` (not its square root, as FID)
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: expected (N_a, D) and (N_b, D) with the same D, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    mu_a, cov_a = gaussian_stats(a)
    mu_b, cov_b = gaussian_stats(b)
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2.0).clamp_min(0.0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * cross)
