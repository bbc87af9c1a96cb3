"""The FCN study of the m-height example: its grid of widths, dropout and learning rate, and its table.

The seed searched 22 FCN configurations (hidden widths, dropout, learning rate) and kept
``[512, 256, 128]``, dropout 0.3, lr 5e-4 (validation Log2-MSE 1.4056). ``mheight_moe.py --study
fcn`` trains one FCN per point of :func:`grid` and prints :func:`study_table`.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

__all__ = ["GridPoint", "grid", "ints", "study_table"]


class GridPoint(NamedTuple):
    """One FCN configuration of the study; ``name`` is its folder under ``OUT/study/``."""

    widths: tuple[int, ...]
    dropout: float
    lr: float

    @property
    def name(self) -> str:
        return f"w{'-'.join(map(str, self.widths))}_d{self.dropout:g}_lr{self.lr:g}"


def ints(text: str) -> tuple[int, ...]:
    """``"512,256,128"`` -> ``(512, 256, 128)``; a ``ValueError`` unless every entry is a positive int."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"widths: expected comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"widths: expected comma-separated positive ints, got {text!r}")
    return values


def _floats(name: str, text: str, low: float, high: float) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(low <= v < high for v in values):
        raise ValueError(f"{name}: expected comma-separated numbers in [{low}, {high}), got {text!r}")
    return values


def grid(widths: str, dropout: str, lr: str) -> list[GridPoint]:
    """The cartesian grid of ``';'``-separated width lists, comma-separated dropouts and learning rates."""
    width_lists = [ints(w) for w in widths.split(";") if w.strip()]
    if not width_lists:
        raise ValueError(f"--grid-widths: expected ';'-separated width lists, got {widths!r}")
    points = [GridPoint(w, d, r) for w, d, r in itertools.product(
        width_lists, _floats("--grid-dropout", dropout, 0.0, 1.0), _floats("--grid-lr", lr, 1e-12, 1.0))]
    if len(set(points)) != len(points):
        raise ValueError("--grid-*: expected distinct values, got a repeated grid point")
    return points


def study_table(rows: list[dict], baseline: dict) -> str:
    """Validation and test Log2-MSE per grid point, best first, under the group-mean baseline's line."""
    head = f"{'widths':<18}{'dropout':>8}{'lr':>9}{'params':>10}{'best ep':>8}{'val':>9}{'test':>9}{'time s':>8}"
    lines = ["FCN study: Log2-MSE per configuration (lower is better)", head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: r["val"]["overall"]):
        lines.append(f"{','.join(map(str, r['widths'])):<18}{r['dropout']:>8g}{r['lr']:>9g}{r['parameters']:>10,}"
                     f"{r['best_epoch']!s:>8}{r['val']['overall']:>9.4f}{r['test']['overall']:>9.4f}"
                     f"{r['train_time_s']:>8.0f}")
    lines.append("-" * len(head))
    lines.append(f"{'group mean':<53}{baseline['val']['overall']:>9.4f}{baseline['test']['overall']:>9.4f}")
    return "\n".join(lines)
