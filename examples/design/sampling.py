"""Generate designs with the decoder and judge them with the frozen encoder and abstractor.

Shared by the decoder's three stages (train, reward fine-tuning, latent optimisation):

- :func:`start_noise`: the start noise ``x_T`` of sample ``i`` is row ``i`` of one seeded draw,
  so a sample depends on its seed and row, never on the batch or the number of processes;
- :func:`generate`: DDIM samples (eta 0, classifier-free guidance at ``scale``) for given rows of
  conditions and start noise, sharded over the ranks (``predict_rows``), images in [0, 1];
- :class:`Judge`: image -> the encoder's hard F -> the abstractor's goal, format, tone and
  grammar estimates; the grammar formulas on the image and the hard F; and the encoder features
  of the Frechet encoder distance (the U-Net trunk's encoder levels, each averaged over the map);
- :func:`best_of_n`: the baseline of the reward stages: per condition, the best of N samples by
  the measured grammar score;
- :func:`fidelity`: what the critics read back against the conditions; :func:`frechet_by_format`:
  the Frechet encoder distance per format (generated designs of a format against real ones);
- :func:`save_grid`: rows of images as one PNG.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from blockyard.blocks import DDPMScheduler
from blockyard.train import autocast, predict_rows

from .diffusion import ddim_chain, guided_eps
from .frechet import frechet_distance
from .grammar import grammar_scores
from .models import DesignAbstractor, DesignEncoder
from .reward import to_image
from .vocab import GRAMMAR_NAMES

__all__ = ["Conditions", "Judge", "Judged", "best_of_n", "fidelity", "frechet_by_format", "generate", "save_grid",
           "start_noise"]


class Conditions(NamedTuple):
    """Metadata to generate from. Shapes: goal, format ``(N,)`` long; tone ``(N,)`` float."""

    goal: torch.Tensor
    format: torch.Tensor
    tone: torch.Tensor

    def rows(self, rows: torch.Tensor) -> Conditions:
        return Conditions(*(v[rows.to(v.device)] for v in self))

    def to(self, device: torch.device | str) -> Conditions:
        return Conditions(*(v.to(device) for v in self))


def start_noise(n: int, size: int, seed: int) -> torch.Tensor:
    """``(n, 3, size, size)`` standard normal start noise, row ``i`` the same for any ``n > i``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def generate(model: nn.Module, scheduler: DDPMScheduler, noise: torch.Tensor, cond: Conditions, *, scale: float,
             steps: int, batch_size: int, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """DDIM samples (``steps`` steps, eta 0) of every row, as RGB images in [0, 1], on every rank.

    Shapes:
        - noise: ``(N, 3, H, W)``; cond: :class:`Conditions` of ``N`` rows
        - output: ``(N, 3, H, W)`` float32 in [0, 1]
    """
    model.eval()

    def rows_fn(rows: torch.Tensor) -> torch.Tensor:
        c = cond.rows(rows).to(device)
        with autocast(device, precision):
            def eps_fn(x, t):
                return guided_eps(model, x, t, c.goal, c.format, c.tone, scale).float()

            return to_image(ddim_chain(eps_fn, noise[rows.cpu()].to(device), scheduler, steps).sample)

    return predict_rows(rows_fn, noise.shape[0], batch_size=batch_size, device=device).cpu()


class Judged(NamedTuple):
    """What the frozen critics say about a set of images.

    Shapes:
        - goal, format: ``(N,)`` long predictions; tone: ``(N,)``
        - grammar: ``(N, 4)`` the formulas on the image and the encoder's hard F
        - grammar_abstractor: ``(N, 4)`` the abstractor's estimate
        - features: ``(N, D)`` encoder features (:meth:`Judge.features`)
    """

    goal: torch.Tensor
    format: torch.Tensor
    tone: torch.Tensor
    grammar: torch.Tensor
    grammar_abstractor: torch.Tensor
    features: torch.Tensor


class Judge(nn.Module):
    """The frozen encoder and abstractor as one scorer of images (see the module docstring).

    Both models are put in eval mode with ``requires_grad`` off.
    """

    def __init__(self, encoder: DesignEncoder, abstractor: DesignAbstractor) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.abstractor = abstractor.eval().requires_grad_(False)

    def structure_and_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard F ``(B, 4, H, W)`` and features ``(B, sum(widths))``: each U-Net encoder level's output,
        averaged over its map, concatenated (finest first)."""
        pooled: list[torch.Tensor] = []
        hooks = [level.register_forward_hook(lambda _m, _i, out: pooled.append(out.float().mean(dim=(2, 3))))
                 for level in self.encoder.unet.encoders]
        try:
            hard = self.encoder.structure(image)
        finally:
            for h in hooks:
                h.remove()
        return hard, torch.cat(pooled, dim=1)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Packed ``(B, 3 + 8 + D)``: goal, format, tone, grammar (4), abstractor grammar (4), features."""
        hard, features = self.structure_and_features(image)
        out = self.abstractor(hard)
        return torch.cat([out.goal.argmax(1, keepdim=True).float(), out.format.argmax(1, keepdim=True).float(),
                          out.tone[:, None].float(), grammar_scores(image.float(), hard), out.grammar.float(),
                          features], dim=1)

    def judge(self, images: torch.Tensor, batch_size: int, device: torch.device) -> Judged:
        """:class:`Judged` of every image, sharded over the ranks, on every rank (CPU tensors)."""
        packed = predict_rows(lambda rows: self(images[rows.cpu()].to(device)), images.shape[0],
                              batch_size=batch_size, device=device).cpu()
        k = len(GRAMMAR_NAMES)
        return Judged(packed[:, 0].long(), packed[:, 1].long(), packed[:, 2], packed[:, 3:3 + k],
                      packed[:, 3 + k:3 + 2 * k], packed[:, 3 + 2 * k:])


def best_of_n(model: nn.Module, scheduler: DDPMScheduler, judge: Judge, cond: Conditions, ns: Sequence[int], *,
              size: int, seed: int, scale: float, steps: int, batch_size: int, device: torch.device,
              precision: str = "fp32") -> dict[int, float]:
    """Mean over conditions of the best measured grammar score (mean of 4) among N samples, for each N in ``ns``.

    Sample ``k`` of a condition starts from ``start_noise(n, size, seed + k)``: sample 0 is the
    one a single draw with ``seed`` makes, so best-of-1 is the plain sampler.
    """
    n, best, out = cond.goal.shape[0], None, {}
    for k in range(max(ns)):
        samples = generate(model, scheduler, start_noise(n, size, seed + k), cond, scale=scale, steps=steps,
                           batch_size=batch_size, device=device, precision=precision)
        score = judge.judge(samples, batch_size, device).grammar.mean(dim=1)
        best = score if best is None else torch.maximum(best, score)
        if k + 1 in ns:
            out[k + 1] = float(best.mean())
    return out


def fidelity(judged: Judged, cond: Conditions) -> dict[str, float | list[float]]:
    """Goal and format accuracy and tone MAE of the critics' reading against ``cond``; mean grammar scores."""
    return {"goal_accuracy": float((judged.goal == cond.goal).float().mean()),
            "format_accuracy": float((judged.format == cond.format).float().mean()),
            "tone_mae": float((judged.tone - cond.tone).abs().mean()),
            "grammar": judged.grammar.mean(0).tolist(), "grammar_mean": float(judged.grammar.mean()),
            "grammar_abstractor_mean": float(judged.grammar_abstractor.mean())}


def frechet_by_format(features: torch.Tensor, formats: torch.Tensor, real_features: torch.Tensor,
                      real_formats: torch.Tensor) -> float:
    """Mean over formats of the Frechet distance between the rows of that format in each set.

    Formats with fewer than 2 rows in either set are left out (a covariance needs 2).
    """
    out = [frechet_distance(features[formats == f], real_features[real_formats == f])
           for f in sorted(set(formats.tolist()) & set(real_formats.tolist()))
           if (formats == f).sum() > 1 and (real_formats == f).sum() > 1]
    if not out:
        raise ValueError("formats: no format has 2 rows in both sets")
    return sum(out) / len(out)


def save_grid(path: str | os.PathLike, rows: Sequence[torch.Tensor], scale: int = 2, pad: int = 2) -> str:
    """Save rows of images ``(n_i, 3, H, W)`` in [0, 1] as one PNG (white gaps, nearest upscaling by ``scale``)."""
    from PIL import Image

    h, w = rows[0].shape[2], rows[0].shape[3]
    cols = max(r.shape[0] for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        pixels = (row.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, image in enumerate(pixels):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = image
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return str(path)
