"""Grid-lines ptychography simulator (the FNO stability seed's `grid_lines` workflow, in torch).

A random blurred-lines object with amplitude and phase is scanned by a complex probe; each scan
position gives the far-field diffraction amplitude of probe x object patch, with Poisson shot
noise at a photon budget. A model maps diffraction amplitude to the complex object patch;
predictions are stitched from patch centres for image-level metrics.

Faithful to the seed's simulator (lines rasterised on a 2S canvas, blur ``g1 + 2 g5 + 5 g10``
scaled with S, phase ``pi * tanh((A - max A / 2) / (3 mean A))`` -- the ``--set-phi`` formula the
seed's control runs forgot --, ortho FFT with fftshift, ``sqrt(Poisson(amp^2))``), with a soft
disk probe carrying a defocus phase instead of the experimental probe file (a real,
centrosymmetric probe makes single-patch reconstruction ambiguous up to a twin image).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Scan", "Splits", "diffract", "lines_object", "make_probe", "simulate", "simulate_splits", "stitch"]


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = img[None, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x[0, 0]


def lines_object(size: int, n_lines: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Complex ``(size, size)`` object: blurred random line segments as amplitude, phase from amplitude.

    Lines are drawn on a ``2 size`` canvas (density of the seed's 400 lines on 784 px unless
    ``n_lines`` is given), blurred with ``g(s) + 2 g(5 s) + 5 g(10 s)``, ``s = size / 392``, and the
    centre cropped. Amplitude is scaled to max 1.
    """
    canvas = 2 * size
    if n_lines is None:
        n_lines = max(8, round(400 * (canvas / 784) ** 2))
    ends = torch.rand(n_lines, 2, 2, generator=generator) * canvas
    steps = 2 * canvas
    t = torch.linspace(0, 1, steps)[None, :, None]
    pts = (ends[:, :1] + t * (ends[:, 1:] - ends[:, :1])).round().long().clamp(0, canvas - 1).reshape(-1, 2)
    img = torch.zeros(canvas * canvas)
    img[pts[:, 0] * canvas + pts[:, 1]] = 1.0
    img = img.view(canvas, canvas)
    s = max(size / 392, 0.25)
    img = _gaussian_blur(img, s) + 2 * _gaussian_blur(img, 5 * s) + 5 * _gaussian_blur(img, 10 * s)
    lo = size // 2
    amp = img[lo:lo + size, lo:lo + size]
    amp = amp / amp.max().clamp_min(1e-12)
    phase = math.pi * torch.tanh((amp - amp.max() / 2) / (3 * amp.mean().clamp_min(1e-12)))
    return torch.polar(amp, phase)


def make_probe(n: int, radius: float | None = None, defocus: float = 2.0) -> torch.Tensor:
    """Complex ``(n, n)`` probe: a soft disk (radius ``n / 6``) with a quadratic defocus phase.

    Normalised like the seed's ``set_probe``: divided by ``10 * mean |P|`` inside radius ``n / 4``.
    """
    radius = n / 6 if radius is None else radius
    c = (n - 1) / 2
    y, x = torch.meshgrid(torch.arange(n) - c, torch.arange(n) - c, indexing="ij")
    r = torch.sqrt(y**2 + x**2)
    amp = torch.sigmoid((radius - r) * 2.0)
    probe = torch.polar(amp, defocus * (r / radius) ** 2)
    inner = r <= n / 4
    return probe / (10 * probe.abs()[inner].mean())


def diffract(obj_patches: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Far-field amplitude ``|fftshift(FFT_ortho(probe * patch))|`` of complex patches ``(..., n, n)``."""
    field = torch.fft.fft2(obj_patches * probe, norm="ortho")
    return torch.fft.fftshift(field.abs(), dim=(-2, -1))


class Scan(NamedTuple):
    """A simulated scan of one object.

    - diffraction: ``(P, 1, n, n)`` float32 noisy diffraction amplitude (the model input)
    - patches: ``(P, n, n)`` complex64 ground-truth object patches
    - obj: ``(S, S)`` complex64 full object
    - probe: ``(n, n)`` complex64
    - grid: ``(rows, cols)`` of scan positions; patch ``i`` starts at ``(i // cols, i % cols) * stride``
    - stride: scan step in pixels
    """

    diffraction: torch.Tensor
    patches: torch.Tensor
    obj: torch.Tensor
    probe: torch.Tensor
    grid: tuple[int, int]
    stride: int


def simulate(size: int, n: int, stride: int, probe: torch.Tensor, nphotons: float = 1e9,
             generator: torch.Generator | None = None) -> Scan:
    """Draw a lines object of ``size`` px and scan it with ``n``-px patches every ``stride`` px.

    Photon scaling as in the seed: ``scale = sqrt(nphotons / mean_patches sum |probe * patch|^2)``;
    the observed amplitude is ``sqrt(Poisson((scale * amp)^2)) / scale``.
    """
    if n > size:
        raise ValueError(f"n: expected a patch size <= size={size}, got {n}")
    obj = lines_object(size, generator=generator)
    patches = torch.view_as_complex(
        F.unfold(torch.view_as_real(obj).permute(2, 0, 1)[None], n, stride=stride)
        .view(2, n, n, -1).permute(3, 1, 2, 0).contiguous())
    rows = (size - n) // stride + 1
    cols = rows
    amp = diffract(patches, probe)
    scale = math.sqrt(nphotons / float((amp**2).sum((-2, -1)).mean()))
    noisy = torch.sqrt(torch.poisson((scale * amp) ** 2, generator=generator)) / scale
    return Scan(noisy[:, None].float(), patches, obj, probe, (rows, cols), stride)


class Splits(NamedTuple):
    """Three scans of three independently drawn objects: train, validation (model selection, the failure
    rule's curve) and test (the reported reconstruction metrics)."""

    train: Scan
    val: Scan
    test: Scan


def simulate_splits(size: int, n: int, stride: int, probe: torch.Tensor, nphotons: float = 1e9,
                    generator: torch.Generator | None = None) -> Splits:
    """:func:`simulate` three times from one generator: the train, validation and test objects, in that order.

    Each call draws its own lines and its own noise, so the validation object is never the test
    object: the best validation loss is not a test-set number.
    """
    train = simulate(size, n, stride, probe, nphotons, generator=generator)
    val = simulate(size, n, stride, probe, nphotons, generator=generator)
    return Splits(train, val, simulate(size, n, stride, probe, nphotons, generator=generator))


def stitch(patches: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Tile the central ``stride x stride`` crop of each patch ``(P, ..., n, n)`` into an image.

    Returns ``(..., rows * stride, cols * stride)``, the region ``[b, b + rows * stride)`` of the
    object with ``b = (n - stride) // 2``.
    """
    rows, cols = grid
    n = patches.shape[-1]
    b = (n - stride) // 2
    centre = patches[..., b:b + stride, b:b + stride]
    centre = centre.reshape(rows, cols, *patches.shape[1:-2], stride, stride)
    lead = centre.dim() - 4
    perm = (*range(2, 2 + lead), 0, 2 + lead, 1, 3 + lead)
    return centre.permute(perm).reshape(*patches.shape[1:-2], rows * stride, cols * stride)
