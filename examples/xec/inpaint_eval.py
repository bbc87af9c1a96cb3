"""Scoring XEC inpainting per face against the neighbour average and the face mean, and its sensor maps.

Errors are taken on the masked sensors whose truth exists: npho on every masked sensor (in the
network's units, ``sqrt(npho / 1000)``, where Poisson noise is about 0.016 at any count), time on
masked sensors with a valid true time (in ns). The predictions of every sensor come from the same
events and masks in the same call, so the comparison is paired. A fourth column, ``true source``,
predicts the expected values from the simulated source itself (:func:`expected_truth`): no method
sees it, it measures the noise of the truth (Poisson counts, time jitter), the floor under any method.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .baselines import fill_in
from .events import LIGHT_SPEED, expected_photons, normalize_npho
from .geometry import FACE_NAMES, HEX_ROW_LENGTHS, Geometry
from .inpaint import InpaintBatch, XECInpainter, to_sensors
from .model import TIME_SCALE, TIME_SHIFT

__all__ = ["CHANNELS", "METHODS", "error_sums", "evaluate_batch", "expected_truth", "format_table", "plot_face_maps",
           "summarise"]

METHODS = ("inpainting", "neighbours", "face mean", "true source")
CHANNELS = ("npho", "time")
UNITS = (1.0, TIME_SCALE)  # normalised npho stays as it is; normalised time * 2 ns -> ns


def error_sums(preds: list[torch.Tensor], truth: torch.Tensor, scored: torch.Tensor,
               face: torch.Tensor) -> torch.Tensor:
    """Per face, method and channel: sum of ``|error|``, sum of ``error^2``, the count and, for the paired
    comparison with ``preds[1]`` (the neighbour average), the sum of :math:`(e^2 - e_1^2)^2`; float64.

    Shapes: preds ``(B, 4760, 2)`` each; truth ``(B, 4760, 2)``; scored ``(B, 4760, 2)`` bool (True =
    counted); face ``(4760,)``; output ``(len(FACE_NAMES), len(preds), 2, 4)``.
    """
    onehot = torch.nn.functional.one_hot(face, len(FACE_NAMES)).double()  # (4760, F)
    weight = scored.double()
    zero = torch.zeros((), dtype=torch.float64, device=truth.device)
    errors = [torch.where(scored, (pred - truth).double(), zero) for pred in preds]
    rows = []
    for err in errors:
        paired = (err.square() - errors[1].square()).square()
        stats = torch.stack([err.abs(), err.square(), weight, paired], -1).sum(0)  # (4760, 2, 4)
        rows.append(torch.einsum("nf,ncs->fcs", onehot, stats))
    return torch.stack(rows, 1)


def expected_truth(source: torch.Tensor, energy: torch.Tensor, t0: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Normalised expected npho ``sqrt(mu / 1000)`` and time ``(t0 + d / v - 2 ns) / 2 ns`` of every sensor, from the
    true source (the generator's formulas without the noise). Shapes: source ``(n, 3)`` cm, energy and t0
    ``(n,)``; output ``(n, 4760, 2)``."""
    mu = expected_photons(source, geometry, energy)
    time = t0[:, None] + torch.cdist(source, geometry.position) / LIGHT_SPEED
    return torch.stack([normalize_npho(mu), (time - TIME_SHIFT) / TIME_SCALE], -1)


@torch.no_grad()
def evaluate_batch(model: XECInpainter, batch: InpaintBatch,
                   expected: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inpaint ``batch.targets`` and score it, both baselines and (given ``expected``, from
    :func:`expected_truth`) the true source's expectation, on ``batch.scored``.

    The baselines read ``batch.x`` at visible sensors only (visible valid times for the time), like the
    model; eval mode is the caller's business.

    Returns:
        :func:`error_sums` of (inpainting, neighbour average, face mean[, true source]) in the order of
        ``METHODS``, and those predictions, ``(B, 4760, 2)`` each (normalised npho and time).
    """
    pred, _ = to_sensors(model(batch.x, batch.mask, batch.targets))
    visible = ~batch.mask
    seen = batch.x.masked_fill(batch.mask.unsqueeze(1), 0.0)
    npho = fill_in(seen[:, 0], visible, model.face, model.edges)
    time = fill_in(seen[:, 1], visible & (seen[:, 2] > 0.5), model.face, model.edges)
    preds = [pred.float(), torch.stack([npho.neighbours, time.neighbours], -1),
             torch.stack([npho.face_mean, time.face_mean], -1)] + ([] if expected is None else [expected.float()])
    return error_sums(preds, batch.truth, batch.scored, model.face), preds


def summarise(sums: torch.Tensor) -> dict:
    r"""``{face: {channel: {method: {"mae", "rmse", "n", "z"}}}}`` in reported units (npho normalised, time ns),
    NaN where a face has no scored sensor; ``sums`` from :func:`error_sums`, methods in the order of ``METHODS``.

    ``z``: the paired z-score of the method's squared error minus the neighbour average's on the same values,
    :math:`\bar d / (s_d / \sqrt{n})` with :math:`d = e^2 - e_{nb}^2` (negative: better than the neighbour average;
    NaN for the neighbour average itself)."""
    out = {}
    for f, face in enumerate(FACE_NAMES):
        out[face] = {}
        for c, channel in enumerate(CHANNELS):
            out[face][channel] = {}
            for m, method in enumerate(METHODS[:sums.shape[1]]):
                abs_sum, sq_sum, n, paired = (float(v) for v in sums[f, m, c])
                mae = UNITS[c] * abs_sum / n if n else math.nan
                rmse = UNITS[c] * math.sqrt(sq_sum / n) if n else math.nan
                mean = (sq_sum - float(sums[f, 1, c, 1])) / n if n else math.nan
                var = paired / n - mean * mean if n > 1 else math.nan
                z = mean / math.sqrt(var / n) if var > 0 else math.nan
                out[face][channel][method] = {"mae": mae, "rmse": rmse, "n": int(n), "z": z}
    return out


def format_table(summary: dict, title: str) -> tuple[str, list[str]]:
    """Printed table (RMSE / MAE per face, channel and method, and inpainting's paired z against the neighbour
    average) and the list of ``face channel`` entries where inpainting has a lower RMSE than both baselines."""
    names = list(next(iter(next(iter(summary.values())).values())))
    header = f"{'face':<8}{'channel':<8}{'n':>8}" + "".join(f"{m:>22}" for m in names) + f"{'z vs nb':>9}"
    lines = [title, "RMSE / MAE; npho in sqrt(npho / 1000), time in ns; z vs nb: paired z-score of inpainting's "
             "squared error minus the neighbour average's (negative: inpainting better)", header, "-" * len(header)]
    wins = []
    for face, channels in summary.items():
        for channel, methods in channels.items():
            n = methods["inpainting"]["n"]
            cells = [f"{v['rmse']:.4g} / {v['mae']:.4g}" if n else "-" for v in methods.values()]
            z = f"{methods['inpainting']['z']:.1f}" if n else "-"
            lines.append(f"{face:<8}{channel:<8}{n:>8}" + "".join(f"{c:>22}" for c in cells) + f"{z:>9}")
            rmse = {m: v["rmse"] for m, v in methods.items()}
            if n and rmse["inpainting"] < min(rmse["neighbours"], rmse["face mean"]):
                wins.append(f"{face} {channel}")
    return "\n".join(lines), wins


def _hex_xy(geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Node positions in the face plane, in units of the in-row spacing (rows 6.9 cm apart, PMTs 6.12 cm)."""
    lengths = torch.tensor(HEX_ROW_LENGTHS)[geometry.hex_row.cpu()]
    return geometry.hex_col.cpu() - (lengths - 1) / 2, geometry.hex_row.cpu().float() * 6.9 / 6.12


def plot_face_maps(plt, geometry: Geometry, truth: torch.Tensor, mask: torch.Tensor, inpainted: torch.Tensor,
                   neighbours: torch.Tensor, path_of: Callable[[str], Path], prefix: str) -> list[str]:
    """One PNG per face (``path_of(f"{prefix}_{face}.png")``): truth, masked input (masked sensors grey),
    inpainted and neighbour average (visible sensors as measured, masked ones filled in), npho of one event.

    Shapes: truth, inpainted, neighbours ``(4760,)`` normalised npho; mask ``(4760,)`` bool, True = masked.
    """
    truth, inpainted, neighbours = (t.detach().float().cpu() for t in (truth, inpainted, neighbours))
    mask = mask.cpu()
    panels = {"truth": truth, "masked input": truth.masked_fill(mask, math.nan),
              "inpainted": torch.where(mask, inpainted, truth),
              "neighbour average": torch.where(mask, neighbours, truth)}
    geometry = geometry.to("cpu")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")  # masked sensors in the masked input
    names = []
    for face in FACE_NAMES:
        fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
        hex_ids = {"top": geometry.top_ids, "bottom": geometry.bottom_ids}.get(face)
        ids = getattr(geometry, face).sensor_ids if hex_ids is None else hex_ids
        lo, hi = float(truth[ids].min()), float(truth[ids].max())
        hidden = int(mask[ids].sum())
        for ax, (title, values) in zip(axes, panels.items()):
            if hex_ids is None:  # the outer face on its fine grid, where every outer PMT has its place
                image = getattr(geometry, face).to_image(values)
                shown = ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
            else:
                hx, hy = _hex_xy(geometry)
                v = values[ids]
                ax.scatter(hx[v.isnan()], hy[v.isnan()], s=120, marker="h", c="lightgrey")
                shown = ax.scatter(hx, hy, c=v, s=120, marker="h", cmap=cmap, vmin=lo, vmax=hi)
                ax.set_aspect("equal")
            ax.set_title(f"{face}: {title}" + (f" ({hidden} masked)" if title == "masked input" else ""))
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(shown, ax=axes, shrink=0.8, label="sqrt(npho / 1000)")
        name = f"{prefix}_{face}.png"
        fig.savefig(path_of(name), dpi=80)
        plt.close(fig)
        names.append(name)
    return names
