"""Evaluation of one FNO shootout model on one scan: loss, per-patch predictions, stitched images, activations."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from blockyard.blocks import FNOBlock, StableFNOBlock
from blockyard.train import ActivationMonitor, autocast

from .arms import amp_cv, physics_loss, reconstruction_metrics
from .phase import align_patch_phases
from .sim import Scan, stitch

__all__ = ["Evaluation", "activation_profile", "evaluate", "loss_scale", "score_reconstruction"]


class Evaluation(NamedTuple):
    """``loss``: the physics loss over every patch of the scan; ``amplitude``, ``phase``: the predicted
    patches ``(P, n, n)`` (float32, CPU); ``amp_cv``: std / mean of the stitched amplitude."""

    loss: float
    amplitude: torch.Tensor
    phase: torch.Tensor
    amp_cv: float


def loss_scale(scan: Scan, kind: str) -> float:
    """The fixed normaliser of the physics loss: mean observed amplitude (or intensity) of a scan."""
    obs = scan.diffraction.double()
    return float(obs.mean() if kind == "mae" else obs.square().mean())


def evaluate(model: nn.Module, scan: Scan, probe: torch.Tensor, *, loss: str, scale: float, precision: str,
             batch: int = 64) -> Evaluation:
    """The model on every patch of ``scan`` (eval mode, no gradients), then back in train mode."""
    model.eval()
    losses, amps, phases = [], [], []
    with torch.no_grad(), autocast(probe.device, precision):
        for i in range(0, len(scan.diffraction), batch):
            x = scan.diffraction[i:i + batch].to(probe.device)
            rec = model(x)
            losses.append(physics_loss(rec, x, probe, loss, scale) * len(x))
            amps.append(rec.amplitude.float().cpu())
            phases.append(rec.phase.float().cpu())
    model.train()
    amp = torch.cat(amps)
    return Evaluation(float(torch.stack(losses).sum()) / len(scan.diffraction), amp, torch.cat(phases),
                      amp_cv(stitch(amp, scan.grid, scan.stride)))


def score_reconstruction(ev: Evaluation, scan: Scan) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Reconstruction metrics of an evaluation on the scan's object, and the stitched images.

    The phase is scored twice: stitched as predicted (one offset removed for the image), and with
    each patch's unobservable offset removed first (:mod:`fno.phase`, weight ``|probe|^2``).
    """
    amp, phase = stitch(ev.amplitude, scan.grid, scan.stride), stitch(ev.phase, scan.grid, scan.stride)
    weight = scan.probe.abs().square()
    aligned = stitch(align_patch_phases(ev.phase, scan.patches.angle(), weight), scan.grid, scan.stride)
    b = (scan.patches.shape[-1] - scan.stride) // 2
    region = scan.obj[b:b + amp.shape[0], b:b + amp.shape[1]]
    images = {"amplitude": amp, "phase": phase, "phase_patch_aligned": aligned,
              "true_amplitude": region.abs(), "true_phase": region.angle()}
    return reconstruction_metrics(amp, phase, region, phase_patch=aligned), images


def activation_profile(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean, std and largest magnitude of every FNO block's output on ``x``."""
    with ActivationMonitor(model, module_types=(FNOBlock, StableFNOBlock)) as monitor, torch.no_grad():
        model(x)
    return {name: {"mean": s.mean, "std": s.std, "abs_max": s.abs_max} for name, s in monitor.stats().items()}
