"""The inference evaluation's tables: per-pattern rows of the three settings (``infer.run_evaluation``'s
items) and their text rendering. Every row is means over its grids; ``*_fraction`` in ``[0, 1]``,
``*_pct`` in percent, ``None`` for a mean over nothing."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["anneal_row", "format_table", "greedy_row", "rows_by_pattern", "seed_protocol_row"]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def greedy_row(items: list[dict]) -> dict[str, Any]:
    row: dict[str, Any] = {"n": len(items), "start_crossings": _mean([it["start"] for it in items])}
    for name in ("model", "random"):
        runs = [it[name] for it in items]
        reductions = [r["initial"] - r["final"] for r in runs]
        row[f"{name}_mean_reduction"] = _mean(reductions)
        row[f"{name}_improved_fraction"] = _mean([float(d > 0) for d in reductions])
        row[f"{name}_mean_tries"] = _mean([r["tries"] for r in runs])
        firsts = [r["first_improvement"] for r in runs if r["first_improvement"] is not None]
        row[f"{name}_tries_to_first"] = _mean(firsts)
    row["model_seeded_ops"] = _mean([it["model"]["seeded"] for it in items])
    row["oracle_mean_reduction"] = _mean([it["oracle"] for it in items])
    row["teacher_rest_mean_reduction"] = _mean([it["teacher_rest"] for it in items])
    return row


def anneal_row(items: list[dict]) -> dict[str, Any]:
    row: dict[str, Any] = {"n": len(items), "initial_crossings": _mean([it["initial"] for it in items]),
                           "budget": _mean([it["budget"] for it in items]),
                           "teacher_mean_reduction": _mean([it["teacher"] for it in items])}
    for name in ("model", "uniform"):
        runs = [it[name] for it in items]
        reductions = [r["initial"] - r["best"] for r in runs]
        row[f"{name}_mean_reduction"] = _mean(reductions)
        row[f"{name}_improved_fraction"] = _mean([float(d > 0) for d in reductions])
        row[f"{name}_reached_teacher_fraction"] = _mean([float(r["reached_at"] is not None) for r in runs])
        row[f"{name}_ops_to_teacher"] = _mean([r["reached_at"] for r in runs if r["reached_at"] is not None])
    return row


def seed_protocol_row(items: list[dict]) -> dict[str, Any]:
    row: dict[str, Any] = {"n": len(items), "initial_crossings": _mean([it["initial"] for it in items])}
    for name in ("model", "random"):
        runs = [it[name] for it in items]
        reductions = [r["initial"] - r["final"] for r in runs]
        row[f"{name}_mean_reduction"] = _mean(reductions)
        row[f"{name}_mean_reduction_pct"] = _mean([100 * d / max(r["initial"], 1) for d, r in zip(reductions, runs)])
        row[f"{name}_improved_fraction"] = _mean([float(d > 0) for d in reductions])
        row[f"{name}_reached_teacher_fraction"] = _mean([float(r["final"] <= it["teacher_final"])
                                                         for r, it in zip(runs, items)])
        row[f"{name}_mean_tries"] = _mean([r["tries"] for r in runs])
    row["model_seeded_ops"] = _mean([it["model"]["seeded"] for it in items])
    teacher = [it["teacher_initial"] - it["teacher_final"] for it in items]
    row["teacher_mean_reduction"] = _mean(teacher)
    row["teacher_mean_reduction_pct"] = _mean([100 * d / max(it["teacher_initial"], 1)
                                               for d, it in zip(teacher, items)])
    return row


def rows_by_pattern(items: list[dict], row_fn) -> dict[str, dict]:
    by_pattern: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_pattern[it["pattern"]].append(it)
    rows = {p: row_fn(v) for p, v in sorted(by_pattern.items())}
    rows["overall"] = row_fn(items)
    return rows


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.0f}%", "f1": f"{value:.1f}", "f2": f"{value:.2f}", "int": f"{value:.0f}"}[kind]


def _table(title: str, rows: dict[str, dict], columns: list[tuple[str, str, str]]) -> str:
    header = ["pattern"] + [c[0] for c in columns]
    body = [[name] + [_fmt(row.get(key), kind) for _, key, kind in columns] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, body[:-1]), rule, line(body[-1])])


def format_table(results: dict[str, Any]) -> str:
    """One text table per setting: rows = zone patterns + overall."""
    t1 = _table("Setting 1: greedy from mid-trajectory states, model vs random order at the same try budget",
                results["setting1"], [
                    ("n", "n", "int"), ("start", "start_crossings", "f1"),
                    ("red model", "model_mean_reduction", "f2"), ("red random", "random_mean_reduction", "f2"),
                    ("impr model", "model_improved_fraction", "pct"),
                    ("impr random", "random_improved_fraction", "pct"),
                    ("1st model", "model_tries_to_first", "f1"), ("1st random", "random_tries_to_first", "f1"),
                    ("tries", "model_mean_tries", "f1"), ("red oracle", "oracle_mean_reduction", "f2"),
                    ("red teacher", "teacher_rest_mean_reduction", "f2")])
    t2 = _table("Setting 2: annealing from the initial paths, model-weighted vs uniform proposals (teacher)",
                results["setting2"], [
                    ("n", "n", "int"), ("initial", "initial_crossings", "f1"), ("budget", "budget", "int"),
                    ("red model", "model_mean_reduction", "f2"), ("red uniform", "uniform_mean_reduction", "f2"),
                    ("impr model", "model_improved_fraction", "pct"),
                    ("impr uniform", "uniform_improved_fraction", "pct"),
                    ("reach model", "model_reached_teacher_fraction", "pct"),
                    ("reach uniform", "uniform_reached_teacher_fraction", "pct"),
                    ("ops model", "model_ops_to_teacher", "int"), ("ops uniform", "uniform_ops_to_teacher", "int"),
                    ("red teacher", "teacher_mean_reduction", "f2")])
    t3 = _table("Setting 3: the seed's inference protocol from the initial paths, model vs random order at the "
                "same op checks", results["setting3"], [
                    ("n", "n", "int"), ("initial", "initial_crossings", "f1"),
                    ("red model", "model_mean_reduction", "f2"), ("red %", "model_mean_reduction_pct", "f1"),
                    ("red random", "random_mean_reduction", "f2"),
                    ("red teacher", "teacher_mean_reduction", "f2"), ("teacher %", "teacher_mean_reduction_pct", "f1"),
                    (">= teacher", "model_reached_teacher_fraction", "pct"),
                    (">= t. random", "random_reached_teacher_fraction", "pct"),
                    ("impr model", "model_improved_fraction", "pct"),
                    ("impr random", "random_improved_fraction", "pct"),
                    ("seeded", "model_seeded_ops", "f2"), ("tries", "model_mean_tries", "f1")])
    notes = ("red = mean crossing reduction; impr = share of grids improved; 1st = mean tries to the first "
             "improvement (improved grids only); tries = op checks per grid (both searches); reach = share "
             "reaching the teacher record's result, ops = proposals needed (those that reached it); "
             ">= teacher = share ending at or below the teacher's final count; seeded = ops kept by history seeding")
    return f"{t1}\n\n{t2}\n\n{t3}\n{notes}"
