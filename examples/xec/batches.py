"""In-memory XEC splits, resolution metrics and the classical estimators xec_mae.py compares against.

A :class:`Split` holds the network inputs of every event (``sensor_inputs``), the standardised
targets and the raw events' few quantities the classical estimators need. Resolution per target
follows the seed's regressor metrics (research §2.3): the 68th percentile of ``|pred - true|``,
plus RMSE and bias.
"""
from __future__ import annotations

import copy
import math

import torch

from blockyard.blocks import random_mask

from .events import LIGHT_SPEED, R_INNER, TARGET_NAMES, Events, generate
from .geometry import INNER, Geometry
from .model import sensor_inputs

__all__ = ["Classical", "Split", "channel_dropout", "resolution"]


class Split:
    """One split in memory. ``x (n, 3, 4760)`` inputs, ``npho (n, 4760)`` normalised npho (the MAE
    target, ``x[:, 0]``), ``dead (4760,)`` (True = dead), ``targets (n, 5)`` raw, ``z (n, 5)``
    standardised with the given (training) ``mean``/``std``; ``events`` keeps the raw counts and times."""

    def __init__(self, n: int, geometry: Geometry, seed: int, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, chunk_size: int = 32) -> None:
        self.events: Events = generate(n, geometry, torch.Generator().manual_seed(seed), chunk_size=chunk_size)
        self.n, self.seed, self.chunk_size, self.generated = n, seed, chunk_size, n
        self.x = sensor_inputs(self.events.npho, self.events.time, self.events.time_mask)
        self.npho = self.x[:, 0]
        self.dead = self.events.dead
        self.targets = self.events.targets
        self.mean = self.targets.mean(0) if mean is None else mean
        self.std = self.targets.std(0) if std is None else std
        self.z = (self.targets - self.mean) / self.std
        self.prior: torch.Tensor | None = None  # (n, 5) standardised classical estimates, set by the caller

    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> Split:
        """Standardise the targets with another split's ``mean`` and ``std`` (the labelled training part's)."""
        self.mean, self.std = mean.to(self.targets.device), std.to(self.targets.device)
        self.z = (self.targets - self.mean) / self.std
        return self

    def prior_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``prior[rows]``, or None when no prior is set."""
        return None if self.prior is None else self.prior[rows]

    def alive_inputs(self, geometry: Geometry) -> torch.Tensor:
        """Inputs ``(n, 3, 4760)`` of the same events with every sensor alive, on ``geometry``'s device: the
        generator draws every sensor's counts and times before it zeroes the dead ones, so a rerun with the same
        seed and no dead channel equals ``x`` at the live sensors and adds the truth behind the dead ones (known
        in simulation only)."""
        alive = generate(self.generated, geometry, torch.Generator().manual_seed(self.seed), chunk_size=self.chunk_size,
                         dead=torch.zeros_like(self.dead, device=geometry.position.device))
        return sensor_inputs(alive.npho[:self.n], alive.time[:self.n], alive.time_mask[:self.n])

    def head(self, n: int) -> Split:
        """The first ``n`` events as a split of their own, standardised by their own targets (a
        labelled subset: only its labels are known)."""
        if not 1 <= n <= self.n:
            raise ValueError(f"n: expected 1 <= n <= {self.n}, got {n}")
        part = copy.copy(self)
        part.events = Events(*(t[:n] for t in self.events[:3]), self.events.dead, *(t[:n] for t in self.events[4:]))
        part.n, part.x, part.targets = n, self.x[:n], self.targets[:n]
        part.npho = part.x[:, 0]
        part.mean, part.std = part.targets.mean(0), part.targets.std(0)
        part.z = (part.targets - part.mean) / part.std
        return part

    def to(self, device) -> Split:
        for name in ("x", "npho", "dead", "targets", "z", "mean", "std", "prior"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self.npho = self.x[:, 0]
        return self


def channel_dropout(dead: torch.Tensor, batch: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Training mask ``(batch, 4760)`` (True = masked): the dead sensors plus, in each row, ``round(ratio * live)``
    live sensors drawn uniformly (``random_mask``), as if they were dead too (``--channel-dropout``).

    Shapes: dead ``(4760,)`` bool; the draw is on the CPU with ``generator``, the result on ``dead``'s device.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a fraction in [0, 1), got {ratio}")
    mask = dead.expand(batch, -1)
    if ratio == 0.0:
        return mask
    return mask | random_mask(batch, dead.numel(), ratio, valid=~mask.cpu(), generator=generator).to(dead.device)


def resolution(pred: torch.Tensor, true: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per target: ``rmse``, ``res68`` (68th percentile of the absolute residual) and ``bias``.

    Shapes: pred, true ``(n, 5)`` in physical units (cm, MeV, ns); columns ``TARGET_NAMES``.
    A column of ``pred`` that is all NaN (no estimate) gives NaN metrics.
    """
    res = (pred.double() - true.double()).cpu()
    out = {}
    for k, name in enumerate(TARGET_NAMES):
        r = res[:, k]
        out[name] = {"rmse": float(r.square().mean().sqrt()), "res68": float(r.abs().quantile(0.68)),
                     "bias": float(r.mean())}
    return out


class Classical:
    """Cheap non-learned estimators, each linearly calibrated (least squares) on the training split.

    - u, v: npho-weighted centroid of the inner face (u = z, v = R_inner (phi - pi) of the sensors);
    - energy: total npho of the live sensors;
    - t0: npho-weighted mean over time-valid sensors of ``t_i - d_i / v_light``, with ``d_i`` the
      distance to the calibrated (u, v) point at the training mean depth;
    - w (depth): none (NaN); it needs the spot shape.
    """

    def __init__(self, geometry: Geometry, train: Split) -> None:
        self.geometry = geometry
        inner = geometry.face == INNER
        pos = geometry.position
        phi = torch.atan2(pos[:, 1], pos[:, 0]) % (2 * math.pi)
        self.inner = inner
        self.su, self.sv = pos[:, 2], R_INNER * (phi - math.pi)
        self.depth = float(train.targets[:, 2].mean())
        self.coef = {}
        raw = self._raw(train.events)
        for k, name in enumerate(TARGET_NAMES):
            if name in raw:
                a = torch.stack([torch.ones_like(raw[name]), raw[name]], 1).double()
                self.coef[name] = torch.linalg.lstsq(a, train.targets[:, k, None].double().cpu()).solution[:, 0]
        self.coef.pop("t0", None)  # t0 is calibrated after (u, v), below
        raw_t0 = self._t0(train.events, self._apply(raw))
        a = torch.stack([torch.ones_like(raw_t0), raw_t0], 1).double()
        self.coef["t0"] = torch.linalg.lstsq(a, train.targets[:, 4, None].double().cpu()).solution[:, 0]

    def _raw(self, events: Events) -> dict[str, torch.Tensor]:
        npho = events.npho.cpu().clamp_min(0)
        w = npho[:, self.inner]
        total = w.sum(1).clamp_min(1e-9)
        return {"u": (w * self.su[self.inner]).sum(1) / total, "v": (w * self.sv[self.inner]).sum(1) / total,
                "energy": npho.sum(1), "t0": torch.zeros(npho.shape[0])}

    def _apply(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: (self.coef[name][0] + self.coef[name][1] * raw[name].double()).float()
                for name in raw if name in self.coef}

    def _t0(self, events: Events, est: dict[str, torch.Tensor]) -> torch.Tensor:
        r = R_INNER + self.depth
        phi = est["v"] / R_INNER + math.pi
        source = torch.stack([r * torch.cos(phi), r * torch.sin(phi), est["u"]], 1)
        d = torch.cdist(source.double(), self.geometry.position.double()).float()
        valid = (~events.time_mask).cpu()
        w = events.npho.cpu().clamp_min(0) * valid
        t = (events.time.cpu() - d / LIGHT_SPEED) * valid
        return (w * t).sum(1) / w.sum(1).clamp_min(1e-9)

    def predict(self, events: Events) -> torch.Tensor:
        """``(n, 5)`` estimates in physical units, NaN for w."""
        est = self._apply(self._raw(events))
        est["t0"] = (self.coef["t0"][0] + self.coef["t0"][1] * self._t0(events, est).double()).float()
        n = events.npho.shape[0]
        return torch.stack([est.get(name, torch.full((n,), math.nan)) for name in TARGET_NAMES], 1)
