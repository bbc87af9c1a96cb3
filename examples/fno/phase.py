r"""Per-patch phase alignment: a patch's constant phase is unobservable, so it is removed before scoring.

The far-field amplitude does not change when a patch is multiplied by a constant phase,
``|F(P O e^{ic})| = |F(P O)|``, so one diffraction pattern says nothing about its patch's global
phase. A network that maps each pattern to its patch may give every patch its own offset
``c_p``. Stitching such patches and then removing one offset for the whole image charges the
network for offsets no single pattern determines (and shows as tiling artifacts in the phase).

Each patch's best offset, in the sense the phase metrics already use for the whole image (the
least-squares fit of unit phasors, i.e. a circular mean of the phase error), has a closed form:

.. math::
    c_p = \arg\min_c \sum_r w(r)\,\big|e^{i(\phi_p(r) + c)} - e^{i\theta_p(r)}\big|^2
        = \arg \sum_r w(r)\,e^{i(\theta_p(r) - \phi_p(r))},

with ``\phi_p`` the predicted and ``\theta_p`` the true phase of patch ``p``, and ``w = |probe|^2``
(the illuminated part, where the diffraction constrains the object): expanding the square, only
``-2 Re(e^{ic} \sum_r w e^{i(\phi_p - \theta_p)})`` depends on ``c``, and it is smallest when
``e^{ic}`` cancels that sum's argument. The aligned phase ``\phi_p + c_p`` is what the shootout
stitches for its per-patch phase metrics. It uses the truth, so it is a score, not a reconstruction
method: real ptychography aligns overlapping patches to each other instead.
"""
from __future__ import annotations

import math

import torch

__all__ = ["align_patch_phases", "patch_phase_offsets"]


def _check(pred_phase: torch.Tensor, true_phase: torch.Tensor, weight: torch.Tensor) -> None:
    if pred_phase.dim() != 3:
        raise ValueError(f"pred_phase: expected (P, n, n), got {tuple(pred_phase.shape)}")
    if true_phase.shape != pred_phase.shape:
        raise ValueError(f"true_phase: expected {tuple(pred_phase.shape)} (as pred_phase), got "
                         f"{tuple(true_phase.shape)}")
    if pred_phase.is_complex() or true_phase.is_complex():
        raise TypeError("pred_phase, true_phase: expected real phases in radians, got a complex tensor")
    if weight.shape != pred_phase.shape[-2:]:
        raise ValueError(f"weight: expected {tuple(pred_phase.shape[-2:])}, got {tuple(weight.shape)}")


def patch_phase_offsets(pred_phase: torch.Tensor, true_phase: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each patch's least-squares constant phase ``c_p = arg sum_r w exp(i (true_p - pred_p))`` (module docstring).

    Summed in float64 (a patch's phasors can nearly cancel).

    Args:
        pred_phase: predicted phase per patch, radians.
        true_phase: true phase per patch, radians.
        weight: non-negative per-pixel weight, e.g. ``probe.abs() ** 2``.

    Shapes:
        - pred_phase, true_phase: ``(P, n, n)``
        - weight: ``(n, n)``
        - output: ``(P,)`` float32 offsets in ``(-pi, pi]``; adding ``c_p`` to patch ``p``'s phase aligns it
    """
    _check(pred_phase, true_phase, weight)
    diff = true_phase.double() - pred_phase.double()
    w = weight.double()
    return torch.atan2((w * diff.sin()).sum((-2, -1)), (w * diff.cos()).sum((-2, -1))).float()


def align_patch_phases(pred_phase: torch.Tensor, true_phase: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The predicted phase with each patch's offset (:func:`patch_phase_offsets`) added, wrapped to ``[-pi, pi)``.

    Shapes:
        - pred_phase, true_phase: ``(P, n, n)``; weight: ``(n, n)``
        - output: ``(P, n, n)`` float32
    """
    c = patch_phase_offsets(pred_phase, true_phase, weight)
    return torch.remainder(pred_phase.float() + c[:, None, None] + math.pi, 2 * math.pi) - math.pi
