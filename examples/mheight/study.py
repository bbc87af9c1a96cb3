"""The studies of the m-height example: the FCN grid search, and every model row over several seeds.

``mheight_moe.py --study fcn``: the seed searched 22 FCN configurations (hidden widths, dropout,
learning rate) and kept ``[512, 256, 128]``, dropout 0.3, lr 5e-4 (validation Log2-MSE 1.4056);
the script trains one FCN per point of :func:`grid` and prints :func:`study_table`.

``mheight_moe.py --study rows``: every row of :data:`ROWS` asked for in ``--rows``, once per seed
of ``--seeds``, on one dataset; :func:`rows_table` prints each row's median [IQR] over the seeds
and its paired difference from its reference row (the same seed's run), which is what isolates
an effect: the MoE against the same-budget control, an ablation against the ResNet.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

from blockyard.train import sweep_summary

__all__ = ["ROWS", "GridPoint", "Row", "grid", "ints", "rows_table", "seeds", "study_table"]


class Row(NamedTuple):
    """One row of ``--study rows``: what is trained (``model`` from ``mheight.models.MODELS``, ``gate`` for an MoE),
    on which inputs and split, and the row its paired difference is taken against (``reference``)."""

    label: str
    model: str
    gate: str | None = None
    log_channel: bool = True
    augment: bool = True
    split: str = "code"
    reference: str | None = "resnet"


#: The rows in training order: the fine-tuned rows (MoEs, control) start from this seed's trained expert family
#: (``--experts``, the ResNet by default), so it must be trained first; "hard", "soft" and "topk" are each
#: compared with "control", the same copy fine-tuned the same epochs at the same schedule without a gate.
ROWS: dict[str, Row] = {
    "resnet": Row("ResNet", "resnet", reference=None),
    "fcn": Row("FCN", "fcn"),
    "vit": Row("ViT", "vit"),
    "control": Row("same-budget control: the trained model fine-tuned, no MoE", "control"),
    "hard": Row("MoE, hard gate (one expert per (n, k)), from the trained model", "moe", "hard", reference="control"),
    "soft": Row("MoE, dense soft gate, from the trained model", "moe", "soft", reference="control"),
    "topk": Row("MoE, sparse top-k gate, from the trained model", "moe", "topk", reference="control"),
    "binned": Row("ResNet classifier over log2 h bins", "binned"),
    "nolog": Row("ResNet without the log2|P| channel", "resnet", log_channel=False),
    "noaug": Row("ResNet without the symmetry augmentation", "resnet", augment=False),
    "rowsplit": Row("ResNet on rows split at random (codes leak)", "resnet", split="row"),
}


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


def seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; a ``ValueError`` unless they are distinct non-negative ints."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(f"--seeds: expected distinct comma-separated non-negative ints, got {text!r}")
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


def _cell(values: list[float]) -> str:
    summary = sweep_summary(values)
    if math.isnan(summary.median):
        return "-"
    return f"{summary.median:.4f} [{summary.q25:.4f}, {summary.q75:.4f}]"


def rows_table(records: list[dict], baselines: dict[str, dict]) -> str:
    """Median [q25, q75] over the seeds of each row's val and test Log2-MSE, and of its paired val difference.

    ``records``: one dict per (row, seed) with ``row``, ``seed``, ``val``/``test`` (``overall``), ``parameters``
    and ``train_time_s``; ``baselines``: the group-mean baseline of each split used (``"code"``, ``"row"``).
    The difference is ``row - reference`` on the same seed, over the seeds both ran (negative: the row is better).
    """
    by = {(r["row"], r["seed"]): r for r in records}
    names = [name for name in ROWS if any(r["row"] == name for r in records)]
    head = (f"{'row':<10}{'n':>3}{'val Log2-MSE median [IQR]':>31}{'test median [IQR]':>31}"
            f"{'val - reference, paired by seed':>46}{'params':>11}{'time s':>8}")
    lines = ["m-height rows over seeds: Log2-MSE median [q25, q75] (lower is better)", head, "-" * len(head)]
    for name in names:
        runs = [r for r in records if r["row"] == name]
        ref = ROWS[name].reference
        pairs = [by[name, r["seed"]]["val"]["overall"] - by[ref, r["seed"]]["val"]["overall"]
                 for r in runs if (ref, r["seed"]) in by]
        delta = f"{_cell(pairs)} vs {ref}" if pairs else "-"
        times = sorted(r["train_time_s"] for r in runs)
        lines.append(f"{name:<10}{len(runs):>3}{_cell([r['val']['overall'] for r in runs]):>31}"
                     f"{_cell([r['test']['overall'] for r in runs]):>31}{delta:>46}{runs[0]['parameters']:>11,}"
                     f"{times[len(times) // 2]:>8.0f}")
    lines.append("-" * len(head))
    for split, base in baselines.items():
        lines.append(f"{'group mean, split by ' + split:<34}{base['val']['overall']:>10.4f}{'':<21}"
                     f"{base['test']['overall']:>10.4f}")
    lines += [f"{name}: {ROWS[name].label}" for name in names]
    return "\n".join(lines)
