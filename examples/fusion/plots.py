"""PNG figures of a FusionNet run (matplotlib is an optional extra: without it nothing is drawn).

``curves.png``: loss and validation accuracies per epoch (integer epoch ticks). The accuracies
share a log axis with their baselines, which sit near 1% where the model reaches 10% or more: on
a linear 0-1 axis they were flattened onto the x axis; each baseline is labelled with its value.

``heatmaps.png``: one row per validation grid, labelled with its zone pattern and size; every
panel has a colour bar.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from blockyard.losses import MASK_FILL, gaussian_heatmap
from blockyard.train import pyplot

from .batches import Batch, model_inputs
from .grid import ZONE_PATTERNS

__all__ = ["HeatmapPanels", "curves_figure", "heatmap_panels", "heatmaps_figure", "plot_curves", "plot_heatmaps"]

logger = logging.getLogger(__name__)

# (record key, line style, legend label); baselines last, drawn dotted and labelled with their value
ACCURACIES = [("pos_acc_top1", "o-", "position top-1"), ("pos_acc_top5", "o-", "position top-5"),
              ("oracle_acc_top1", "s--", "oracle top-1 (best hypothesis)"), ("act_acc_at_gt", "^-", "action at target")]
BASELINES = [("baseline_freq_top1", "train-frequency top-1"), ("baseline_uniform_top1", "uniform legal top-1"),
             ("baseline_act_acc", "most frequent action")]


def _pyplot():
    plt = pyplot()
    if plt is None:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
    return plt


def curves_figure(records: list[dict[str, Any]]):
    """The ``curves.png`` figure (loss, accuracies vs baselines), or None without matplotlib or records."""
    plt = _pyplot()
    if plt is None or not records:
        return None
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    ax_loss.plot(epochs, [r["loss"] for r in records], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss (5 pos + act + 0.5 div)", title="loss")
    ax_loss.legend()

    values = []
    for key, style, label in ACCURACIES:
        ys = [r[key] for r in records]
        values += ys
        ax_acc.plot(epochs, ys, style, label=label)
    for key, label in BASELINES:
        ys = [r[key] for r in records]
        values += ys
        (line,) = ax_acc.plot(epochs, ys, ":", linewidth=2, label=f"baseline: {label}")
        ax_acc.annotate(f"{ys[-1]:.1%}", (epochs[-1], ys[-1]), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7, color=line.get_color())
    # log axis from half the smallest positive value (a 0 is drawn on the bottom edge) to just above 1
    positive = [v for v in values if v > 0]
    bottom = min(positive) / 2 if positive else 1e-3
    ax_acc.set_yscale("log", nonpositive="clip")
    ax_acc.set_ylim(bottom, 1.15)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (log scale)", title="accuracy vs baselines")
    ax_acc.legend(fontsize=7, loc="lower left")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="major")
    # room on the right for the baseline labels
    ax_acc.set_xlim(epochs[0] - 0.3, epochs[-1] + 0.3 + 0.15 * max(epochs[-1] - epochs[0], 1))
    fig.tight_layout()
    return fig


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Write :func:`curves_figure` to ``path``; None when nothing is drawn."""
    fig = curves_figure(records)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


class HeatmapPanels(NamedTuple):
    """What ``heatmaps.png`` shows for ``n`` grids (CPU tensors).

    - state: ``(n, 4, H, W)`` stored channels; target, best_map, merged: ``(n, H, W)`` probabilities
    - best: ``(n,)`` winner-takes-all hypothesis; centers: ``(n, 2)`` target ``(y, x)``
    - patterns: the zone pattern name of each grid
    """

    state: torch.Tensor
    target: torch.Tensor
    best_map: torch.Tensor
    merged: torch.Tensor
    best: torch.Tensor
    centers: torch.Tensor
    patterns: list[str]


@torch.no_grad()
def heatmap_panels(model: torch.nn.Module, batch: Batch, n: int = 4) -> HeatmapPanels:
    """Run ``model`` on the first ``n`` grids of ``batch``: the maps that :func:`heatmaps_figure` draws.

    The best hypothesis is the winner-takes-all one (lowest cross-entropy to the target); the
    merged map is ``max_k p_k``, the inference ranking.
    """
    n = min(n, batch.state.shape[0])
    inputs = model_inputs(batch)
    out = model(inputs.x, batch.history, batch.history_len, batch.initial_crossings)
    logits = out.position.float().masked_fill(inputs.mask[:, None], MASK_FILL)
    prob = logits.flatten(2).softmax(-1).view_as(logits)
    target = gaussian_heatmap(inputs.centers, tuple(logits.shape[-2:]), sigma=2.0, mask=inputs.mask)
    per_hyp = -(target[:, None] * prob.clamp_min(1e-12).log()).flatten(2).sum(-1)
    best = per_hyp.argmin(1)
    rows = torch.arange(prob.shape[0], device=prob.device)
    names = [ZONE_PATTERNS[i] if i < len(ZONE_PATTERNS) else "unknown pattern" for i in batch.pattern[:n].tolist()]
    return HeatmapPanels(batch.state[:n].float().cpu(), target[:n].cpu(), prob[rows, best][:n].cpu(),
                         prob.amax(1)[:n].cpu(), best[:n].cpu(), inputs.centers[:n].cpu(), names)


def heatmaps_figure(panels: HeatmapPanels):
    """The ``heatmaps.png`` figure: per grid (row) the state, the target, the best and the merged map.

    The row is labelled with the grid's zone pattern and size; the target anchor is marked with x;
    each panel has a colour bar. None without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.collections import LineCollection

    n = panels.state.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(14, 3.2 * n), squeeze=False)
    size = "x".join(map(str, panels.state.shape[-2:]))
    for i in range(n):
        ty, tx = panels.centers[i].tolist()
        state = panels.state[i]
        maps = [(state[0] + 0.5 * state[3], "zones, boundary, path", "zone id / max (+0.5 on boundaries)"),
                (panels.target[i], "target (sigma 2, legal anchors)", "probability"),
                (panels.best_map[i], f"best hypothesis {int(panels.best[i])}", "probability"),
                (panels.merged[i], "max over hypotheses", "probability")]
        for j, (ax, (img, title, unit)) in enumerate(zip(axes[i], maps)):
            image = ax.imshow(img.numpy(), cmap="viridis")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label(unit, fontsize=7)
            if j == 0:  # the path: H edges join (y, x)-(y, x+1), V edges (y, x)-(y+1, x)
                hy, hx = torch.nonzero(state[1] > 0.5, as_tuple=True)
                vy, vx = torch.nonzero(state[2] > 0.5, as_tuple=True)
                segments = [[(x, y), (x + 1, y)] for y, x in zip(hy.tolist(), hx.tolist())]
                segments += [[(x, y), (x, y + 1)] for y, x in zip(vy.tolist(), vx.tolist())]
                ax.add_collection(LineCollection(segments, colors="white", linewidths=0.8), autolim=False)
                ax.set_ylabel(f"{panels.patterns[i]} zones\n{size} grid", fontsize=10)
            ax.plot([tx], [ty], "rx", markersize=8)
            ax.set_title(title if j else f"{panels.patterns[i]}: {title}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_heatmaps(model: torch.nn.Module, batch: Batch, path: Path, n: int = 4) -> Path | None:
    """Write :func:`heatmaps_figure` of :func:`heatmap_panels` to ``path``; None without matplotlib."""
    if _pyplot() is None:
        return None
    fig = heatmaps_figure(heatmap_panels(model, batch, n))
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path
