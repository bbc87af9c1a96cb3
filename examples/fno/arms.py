"""Arms of the FNO stability shootout: the model per arm, the physics loss and the metrics."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Callable, NamedTuple

import torch
from torch import nn

from blockyard.blocks import FNOBlock, HybridUNO, StableFNOBlock
from blockyard.losses import ssim

from .sim import diffract

__all__ = ["ARMS", "Arm", "PtychoNet", "Reconstruction", "amp_cv", "classify_failure", "clip_arm", "deepest_levels",
           "first_failure", "physics_loss", "reconstruction_metrics", "resolve_arm"]


class Arm(NamedTuple):
    """One configuration: the block every encoder level uses, the clipping rule, and its lr as a multiple of --lr."""

    block: Callable[[int, int], nn.Module]
    clip: str | None  # "norm", "agc" or None
    clip_value: float
    description: str
    lr_scale: float = 1.0


ARMS: dict[str, Arm] = {
    "hybrid": Arm(FNOBlock, None, 0.0, "x + GELU(K x + W x), no clipping (the protocol's control)"),
    "hybrid_clip": Arm(FNOBlock, "norm", 1.0, "hybrid + global norm clip 1.0 (the original's real control)"),
    "hybrid_agc": Arm(FNOBlock, "agc", 0.01, "hybrid + unit-wise AGC 0.01"),
    "stable_zero_gamma": Arm(partial(StableFNOBlock, scale="zero_gamma"), None, 0.0,
                             "norm-last, zero-init InstanceNorm affine, no clipping"),
    "stable_layerscale": Arm(partial(StableFNOBlock, scale="layerscale"), None, 0.0,
                             "norm-last, LayerScale 1e-3, no clipping"),
    "hybrid_lr100": Arm(FNOBlock, None, 0.0, "hybrid, no clipping, 100x --lr: the positive control, built to fail "
                        "(it shows that the failure rule can fire)", lr_scale=100.0),
}

_CLIP_ARM = re.compile(r"hybrid_clip([0-9.eE+-]+)")


def clip_arm(value: float) -> str:
    """The name of the control (``hybrid``) with global norm clip ``value``: ``hybrid_clip5``, ``hybrid_clip0.5``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"value: expected a finite clip threshold > 0, got {value!r}")
    return f"hybrid_clip{value:g}"


def resolve_arm(name: str) -> Arm:
    """An arm by name: one of :data:`ARMS`, or ``hybrid_clip<v>`` (the control with global norm clip ``v``).

    Raises:
        ValueError: for any other name.
    """
    if name in ARMS:
        return ARMS[name]
    match = _CLIP_ARM.fullmatch(name)
    try:
        value = float(match.group(1)) if match else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"arm: expected one of {list(ARMS)} or hybrid_clip<v> (v > 0), got {name!r}")
    return Arm(FNOBlock, "norm", value, f"hybrid + global norm clip {value:g}")


def deepest_levels(patch: int) -> int:
    """The most channel-doubling levels a ``patch`` px input holds: ``levels - 1`` halvings leaving at least 2x2.

    (``HybridUNO`` refuses deeper ones; the seed's 8 levels on 64 px patches would end below one pixel.)
    """
    levels = 1
    while patch % 2**levels == 0 and patch // 2**levels >= 2:
        levels += 1
    return levels


class Reconstruction(NamedTuple):
    """Model output: object amplitude in (0, 1) and phase in (-pi, pi), each ``(B, n, n)``."""

    amplitude: torch.Tensor
    phase: torch.Tensor


class PtychoNet(nn.Module):
    """Diffraction amplitude -> complex object patch with a :class:`HybridUNO` core.

    The input is divided by a fixed ``input_scale`` (the training set's RMS); the two output
    channels become ``amplitude = sigmoid(c0)`` and ``phase = pi * tanh(c1)``. ``levels`` are
    the core's channel-doubling levels (the plan's ``fno_blocks``), each at most ``max_channels``
    wide.
    """

    def __init__(self, block: Callable[[int, int], nn.Module], hidden: int, levels: int, modes: int,
                 blocks_per_level: int = 1, input_scale: float = 1.0, max_channels: int | None = None) -> None:
        super().__init__()
        self.core = HybridUNO(1, 2, hidden=hidden, levels=levels, modes=modes, block=block,
                              blocks_per_level=blocks_per_level, max_channels=max_channels)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    def forward(self, diffraction: torch.Tensor) -> Reconstruction:
        out = self.core(diffraction / self.input_scale)
        return Reconstruction(torch.sigmoid(out[:, 0]), math.pi * torch.tanh(out[:, 1]))


def physics_loss(rec: Reconstruction, observed: torch.Tensor, probe: torch.Tensor, kind: str = "mae",
                 scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Self-supervised loss through the forward model, divided by a fixed dataset-level ``scale``.

    ``mae``: ``mean |A(pred) - obs| / scale`` with ``A`` the far-field amplitude of
    ``probe * pred`` (use ``scale = mean(obs)`` over the training set). ``poisson``: the Poisson
    negative log-likelihood of the observed counts ``obs^2`` under intensity ``A(pred)^2``
    (constants dropped), ``/ scale`` (use ``mean(obs^2)``). The scale is a constant, not the
    batch's own mean: a batch of patches over empty object regions has ``mean(obs) ~ 0`` and
    would blow the loss up (it did, for every arm alike). Float32.
    """
    obj = torch.polar(rec.amplitude.float(), rec.phase.float())
    pred = diffract(obj, probe)
    obs = observed[:, 0].float()
    if kind == "mae":
        return (pred - obs).abs().mean() / scale
    if kind == "poisson":
        lam, k = pred.square(), obs.square()
        return (lam - k * torch.log(lam + 1e-8)).mean() / scale
    raise ValueError(f"kind: expected 'mae' or 'poisson', got {kind!r}")


def _wrap(phase: torch.Tensor) -> torch.Tensor:
    return torch.remainder(phase + math.pi, 2 * math.pi) - math.pi


def amp_cv(amp: torch.Tensor) -> float:
    """std / mean of a stitched amplitude: a collapsed run outputs a constant amplitude (0)."""
    return float(amp.float().std() / amp.float().mean().clamp_min(1e-12))


def _phase_scores(phase: torch.Tensor, true_phase: torch.Tensor) -> tuple[float, float]:
    """SSIM and MAE of a phase image after removing its one mean offset, compared wrapped."""
    offset = torch.angle(torch.exp(1j * (phase - true_phase).double()).mean()).float()
    err = _wrap(_wrap(phase - offset) - true_phase)
    score = ssim(((true_phase + err + math.pi) / (2 * math.pi))[None, None],
                 ((true_phase + math.pi) / (2 * math.pi))[None, None], data_range=1.0)
    return float(score), float(err.abs().mean())


def reconstruction_metrics(amp: torch.Tensor, phase: torch.Tensor, obj: torch.Tensor,
                           phase_patch: torch.Tensor | None = None) -> dict[str, float]:
    """SSIM and MAE of stitched amplitude and phase against the ground-truth object region.

    Amplitude is rescaled by ``mean(target) / mean(pred)`` first (the seed's convention). Phase is
    compared wrapped, mapped to [0, 1] for SSIM, after removing its mean offset: ``phase_*`` from
    ``phase`` (the patches stitched as predicted: one offset for the whole image), ``phase_*_patch``
    from ``phase_patch`` when given (each patch's own unobservable offset removed before stitching,
    :mod:`fno.phase`). ``amp_cv`` is the prediction's std / mean: a collapsed run outputs a constant
    amplitude.
    """
    true_amp, true_phase = obj.abs().float(), obj.angle().float()
    scaled = amp * (true_amp.mean() / amp.mean().clamp_min(1e-12))
    out = {"amp_ssim": float(ssim(scaled[None, None], true_amp[None, None])),
           "amp_mae": float((scaled - true_amp).abs().mean()), "amp_cv": amp_cv(amp)}
    out["phase_ssim"], out["phase_mae"] = _phase_scores(phase, true_phase)
    if phase_patch is not None:
        out["phase_ssim_patch"], out["phase_mae_patch"] = _phase_scores(phase_patch, true_phase)
    return out


def classify_failure(finite: bool, best_val: float, final_val: float, amp_cv: float,
                     init_val: float | None = None) -> str | None:
    """The failure rule, first match wins.

    - ``non-finite``: a non-finite loss;
    - ``collapsed``: a constant output amplitude (std / mean of the stitched validation amplitude < 1e-3);
    - ``diverged``: a final validation loss above 3x the run's best;
    - ``stalled`` (when ``init_val`` is given): a final validation loss no lower than before the first
      step. The first three were pre-registered; the positive control (100x lr, no warmup) showed them
      blind to a frozen output: sigmoids saturated into a fixed, non-constant pattern, zero gradients,
      the loss stuck above its value at init. ``stalled`` was added for that and is reported by name.
    """
    if not finite or not math.isfinite(final_val):
        return "non-finite"
    if amp_cv < 1e-3:
        return "collapsed"
    if final_val > 3 * best_val:
        return "diverged"
    if init_val is not None and final_val >= init_val:
        return "stalled"
    return None


def first_failure(curve: Sequence[Mapping[str, float]], nonfinite_step: int | None = None,
                  init_val: float | None = None) -> tuple[int, str] | None:
    """Time to failure: the step and kind of the first evaluation at which the failure rule fires on the run so far.

    ``curve`` holds one evaluation per epoch (``step``, ``train_loss``, ``val_loss``, ``amp_cv`` of
    the validation reconstruction); at evaluation ``k`` the rule sees ``best = min(val[:k+1])``,
    ``final = val[k]`` and ``init_val`` (the validation loss before the first step). A non-finite
    loss is dated more finely, by ``nonfinite_step``: the first optimizer step whose loss or
    gradient norm was not finite. None if the rule never fires.
    """
    for k, c in enumerate(curve):
        vals = [e["val_loss"] for e in curve[:k + 1]]
        finite = all(math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"]) for e in curve[:k + 1])
        kind = classify_failure(finite, min(vals), vals[-1], c["amp_cv"], init_val)
        if kind is not None:
            step = c["step"]
            if kind == "non-finite" and nonfinite_step is not None:
                step = min(step, nonfinite_step)
            return step, kind
    return None
