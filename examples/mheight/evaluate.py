"""Evaluation of the m-height models: splits in memory, per-group Log2-MSE, the group-mean baseline, routing.

Every metric is reported overall and per (n, k, m) group (:data:`~mheight.heights.GROUPS`), in
float64, on predictions of log2 h.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from blockyard.data import ShardDataset

from .heights import GROUPS, NK
from .models import MoE, encode

__all__ = ["Split", "group_mean_baseline", "group_means", "group_table", "per_group_log2_mse", "plot_groups",
           "routing", "row_split", "shared_code_rows"]


class Split:
    """One split in memory: raw padded P ``matrix (N, 6, 6)``, its true ``shape (N, 2)`` = (k, n - k), ``side (N, 3)``
    = (n, k, m), ``group (N,)`` and ``code (N,)`` (the code's id: the rows of one code share it) on the device;
    ``log2h (N,)`` float64 on the CPU and ``z (N,)``, log2 h standardised by ``mean`` and ``std`` (the training
    split's; its own when not given)."""

    COLUMNS = ("matrix", "shape", "side", "group", "code")

    def __init__(self, columns: dict[str, torch.Tensor], log2h: torch.Tensor, mean: float | None = None,
                 std: float | None = None) -> None:
        for name in self.COLUMNS:
            if columns[name].shape[0] != log2h.shape[0]:
                raise ValueError(f"columns[{name!r}]: expected {log2h.shape[0]} rows, got {tuple(columns[name].shape)}")
        self.matrix, self.shape, self.side, self.group, self.code = (columns[name] for name in self.COLUMNS)
        self.log2h = log2h.double().cpu()
        self.mean = float(self.log2h.mean()) if mean is None else mean
        self.std = float(self.log2h.std()) if std is None else std
        self.z = ((self.log2h - self.mean) / self.std).float().to(self.matrix.device)
        self.n = int(log2h.shape[0])

    @classmethod
    def load(cls, folder: Path, device: torch.device, mean: float | None = None, std: float | None = None) -> Split:
        """The ``ShardDataset`` in ``folder`` (as ``build_data`` wrote it)."""
        ds = ShardDataset(folder)
        dtypes = {"matrix": torch.float32, "shape": torch.int64, "side": torch.float32, "group": torch.int64,
                  "code": torch.int64}
        columns = {name: ds.column(name).to(device, dtype) for name, dtype in dtypes.items()}
        return cls(columns, ds.column("target").double().log2(), mean, std)


def row_split(splits: Sequence[Split], seed: int = 0) -> tuple[Split, ...]:
    """The seed's split: the rows of ``splits`` pooled, shuffled and dealt back into splits of the same sizes.

    The seed split its rows 80/20 at random, so the rows of one code (its m = 2 .. n-k) fall on both
    sides: a model can learn a code's P from one m and be validated on it at another. Our default
    splits by code; this control measures what that leak is worth. Standardised by the new
    first (training) split's mean and std.
    """
    log2h = torch.cat([s.log2h for s in splits])
    columns = {name: torch.cat([getattr(s, name) for s in splits]) for name in Split.COLUMNS}
    order = torch.randperm(len(log2h), generator=torch.Generator().manual_seed(seed))
    out: list[Split] = []
    for idx in order.split([s.n for s in splits]):
        stats = (out[0].mean, out[0].std) if out else (None, None)
        picked = {name: col[idx.to(col.device)] for name, col in columns.items()}
        out.append(Split(picked, log2h[idx], *stats))
    return tuple(out)


def shared_code_rows(split: Split, train: Split) -> float:
    """Share of ``split``'s rows whose code also has a row in ``train`` (0 under the split by code)."""
    return float(torch.isin(split.code, train.code).double().mean())


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
