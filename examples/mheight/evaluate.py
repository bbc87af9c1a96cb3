"""Evaluation of the m-height models: splits in memory, per-group Log2-MSE, the group-mean baseline, routing.

Every metric is reported overall and per (n, k, m) group (:data:`~mheight.heights.GROUPS`), in
float64, on predictions of log2 h.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from blockyard.data import ShardDataset

from .heights import GROUPS, NK
from .models import MoE, encode

__all__ = ["Split", "group_mean_baseline", "group_means", "group_table", "per_group_log2_mse", "plot_groups",
           "routing"]


class Split:
    """One split in memory: raw padded P (N, 6, 6), its true shape (N, 2), side (N, 3), z (N,), group (N,)."""

    def __init__(self, folder: Path, device: torch.device, mean: float | None = None, std: float | None = None):
        ds = ShardDataset(folder)
        self.log2h = ds.column("target").double().log2()
        self.mean = float(self.log2h.mean()) if mean is None else mean
        self.std = float(self.log2h.std()) if std is None else std
        self.matrix = ds.column("matrix").float().to(device)
        self.shape = ds.column("shape").long().to(device)  # true (k, n - k), for the augmentation
        self.side = ds.column("side").float().to(device)
        self.z = ((self.log2h - self.mean) / self.std).float().to(device)
        self.group = ds.column("group").long().to(device)
        self.n = len(ds)


def group_means(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, k, m) mean of ``values`` (float64, 0 for an empty group) and each group's row count."""
    group = group.cpu()
    counts = torch.bincount(group, minlength=len(GROUPS)).double()
    sums = torch.zeros(len(GROUPS), dtype=torch.float64).index_add_(0, group, values.double().cpu())
    return sums / counts.clamp_min(1), counts


def per_group_log2_mse(pred_log2h: torch.Tensor, split: Split) -> dict:
    """Overall and per-(n, k, m) Log2-MSE of predictions of log2 h (float64)."""
    err = (pred_log2h.double().cpu() - split.log2h).square()
    means, counts = group_means(err, split.group)
    return {"overall": float(err.mean()),
            "groups": {str(g): float(m) for g, m, c in zip(GROUPS, means, counts) if c > 0}}


def group_mean_baseline(train: Split, split: Split) -> torch.Tensor:
    """Predict each (n, k, m) group's training mean of log2 h."""
    return group_means(train.log2h, train.group)[0][split.group.cpu()]


def plot_groups(plt, results: dict, path: Path) -> Path:
    """Bar chart of validation Log2-MSE per (n, k, m) group for every model."""
    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(14, 4))
    for i, name in enumerate(names):
        values = [results[name]["val"]["groups"].get(str(g), math.nan) for g in GROUPS]
        ax.bar([j + i * width for j in range(len(GROUPS))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(GROUPS))], [str(g) for g in GROUPS], rotation=60)
    ax.set_ylabel("validation Log2-MSE")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def routing(model: MoE, split: Split, scaling: str) -> dict[str, list[float]]:
    """Mean gate weight of every expert per code shape (n, k) over the rows of ``split``."""
    model.eval()
    features = encode(split.matrix, split.side, scaling)
    with torch.no_grad():
        weights = model.route(features.side, features.key).double().cpu()
    key = features.key.cpu()
    return {str(nk): [round(float(w), 4) for w in weights[key == i].mean(0)] for i, nk in enumerate(NK)
            if bool((key == i).any())}


def group_table(results: dict) -> str:
    """Validation Log2-MSE per (n, k, m) group for every model in ``results``, then overall val and test."""
    names = list(results)
    header = f"{'(n,k,m)':<12}" + "".join(f"{n:>12}" for n in names)
    lines = ["validation Log2-MSE per group (lower is better)", header, "-" * len(header)]
    for g in GROUPS:
        cells = [results[n]["val"]["groups"].get(str(g), math.nan) for n in names]
        lines.append(f"{g!s:<12}" + "".join(f"{c:>12.3f}" for c in cells))
    lines.append("-" * len(header))
    for split in ("val", "test"):
        lines.append(f"{split + ' all':<12}" + "".join(f"{results[n][split]['overall']:>12.4f}" for n in names))
    return "\n".join(lines)
