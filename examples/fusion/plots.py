"""PNG figures of a FusionNet run (matplotlib is an optional extra: without it nothing is drawn)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from blockyard.losses import MASK_FILL, gaussian_heatmap
from blockyard.train import pyplot

from .batches import Batch, model_inputs

__all__ = ["plot_curves", "plot_heatmaps"]

logger = logging.getLogger(__name__)


def _pyplot():
    plt = pyplot()
    if plt is None:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
    return plt


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Train/val loss and validation accuracies against their baselines, per epoch."""
    plt = _pyplot()
    if plt is None or not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    ax_loss.plot(epochs, [r["loss"] for r in records], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss (5 pos + act + 0.5 div)", title="loss")
    ax_loss.legend()
    for key, style in [("pos_acc_top1", "o-"), ("pos_acc_top5", "o-"), ("oracle_acc_top1", "s--"),
                       ("act_acc_at_gt", "^-"), ("baseline_freq_top1", ":"), ("baseline_uniform_top1", ":"),
                       ("baseline_act_acc", ":")]:
        ax_acc.plot(epochs, [r[key] for r in records], style, label=key)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="accuracy vs baselines", ylim=(0, 1))
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_heatmaps(model: torch.nn.Module, batch: Batch, path: Path, n: int = 4) -> Path | None:
    """Per grid: the state, the Gaussian target, the best hypothesis' map and the merged map.

    The best hypothesis is the winner-takes-all one (lowest cross-entropy to the target); the
    merged map is ``max_k p_k``, the inference ranking. The target anchor is marked with x.
    """
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.collections import LineCollection

    n = min(n, batch.state.shape[0])
    inputs = model_inputs(batch)
    out = model(inputs.x, batch.history, batch.history_len, batch.initial_crossings)
    logits = out.position.float().masked_fill(inputs.mask[:, None], MASK_FILL)
    prob = logits.flatten(2).softmax(-1).view_as(logits)
    target = gaussian_heatmap(inputs.centers, tuple(logits.shape[-2:]), sigma=2.0, mask=inputs.mask)
    per_hyp = -(target[:, None] * prob.clamp_min(1e-12).log()).flatten(2).sum(-1)
    best = per_hyp.argmin(1)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for i in range(n):
        ty, tx = inputs.centers[i].tolist()
        state = batch.state[i].float()
        size = "x".join(map(str, batch.state.shape[-2:]))
        panels = [(state[0] + 0.5 * state[3], f"zones, boundary, path ({size})"),
                  (target[i], "target (sigma 2, legal anchors)"),
                  (prob[i, best[i]], f"best hypothesis {int(best[i])}"),
                  (prob[i].amax(0), "max over hypotheses")]
        for j, (ax, (img, title)) in enumerate(zip(axes[i], panels)):
            ax.imshow(img.cpu().numpy(), cmap="viridis")
            if j == 0:  # the path: H edges join (y, x)-(y, x+1), V edges (y, x)-(y+1, x)
                hy, hx = torch.nonzero(state[1] > 0.5, as_tuple=True)
                vy, vx = torch.nonzero(state[2] > 0.5, as_tuple=True)
                segments = [[(x, y), (x + 1, y)] for y, x in zip(hy.tolist(), hx.tolist())]
                segments += [[(x, y), (x, y + 1)] for y, x in zip(vy.tolist(), vx.tolist())]
                ax.add_collection(LineCollection(segments, colors="white", linewidths=0.8))
            ax.plot([tx], [ty], "rx", markersize=8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
