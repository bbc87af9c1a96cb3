"""Writing a FusionNet dataset directory: samples of many trajectories into one grouped store per split.

``write_build`` is what the teacher's build and a trajectory file's import share
(``build_data.py``): split by trajectory, stream every trajectory's samples into its split's
``GroupedStoreWriter`` (bounded memory), oversample inner layers of the training split only,
write ``trajectories.jsonl``, ``splits.json`` and, last and atomically, ``build.json`` (its
presence means the build finished).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from blockyard.data import (
    GroupedStore,
    GroupedStoreWriter,
    balanced_indices,
    file_lock,
    group_split,
    layer_index,
    write_json_atomic,
)

__all__ = ["SPLITS", "default_workers", "format_table", "results_in_order", "write_build"]

SPLITS = ("train", "val", "test")
SPATIAL = ("state", "ops")  # the fields at the grid's resolution (padded together)
VERSION = 2  # 2: every sample stores its op set ("ops"); a version-1 build has none and must be rebuilt
DENSE_BYTES = 9 * 128 * 128 * 4  # the seed's padded float32 model input per sample


def results_in_order(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``fn`` of each item, in order; at most ``4 * workers`` in flight, so memory stays bounded."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # fork: workers inherit the imports (torch takes seconds to import on a loaded box) and
    # only run numpy code, so no OpenMP/torch thread state is used after the fork.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        todo, pending = iter(items), deque()
        for item in todo:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 4 * workers:
                break
        while pending:
            result = pending.popleft().get()
            item = next(todo, None)
            if item is not None:
                pending.append(pool.apply_async(fn, (item,)))
            yield result


def _clear(out: Path) -> None:
    """Remove what an unfinished build may have left (only our own names)."""
    for name in (*SPLITS, ".train_unique", "trajectories.jsonl", "trajectories.jsonl.tmp", "splits.json",
                 "build.json.tmp"):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for path in out.glob(".*.tmp-*"):  # GroupedStoreWriter's temporary directories
        shutil.rmtree(path, ignore_errors=True)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _balance_train(unique_path: Path, out: Path, layers: list[int], shapes: list[tuple[int, int]],
                   max_factor: float, seed: int) -> np.ndarray:
    """Write ``out``: every unique training sample, then the oversampled extras. Returns the picks."""
    unique = GroupedStore(unique_path, verify=False)
    n = len(unique)
    picks = balanced_indices(np.asarray(layers, dtype=np.int64), max_factor=max_factor, seed=seed,
                             groups=[f"{h}x{w}" for h, w in shapes]) if n else np.zeros(0, dtype=np.int64)
    position = np.empty(n, dtype=np.int64)
    position[unique.source_index] = np.arange(n)  # insertion order -> store index
    with GroupedStoreWriter(out, group_key="state", spatial_fields=SPATIAL, overwrite=True) as writer:
        for part in (position[picks[:n]], position[picks[n:]]):
            part = part[np.argsort(unique.group_of(part), kind="stable")] if part.size else part
            groups = unique.group_of(part) if part.size else part
            for g in np.unique(groups):
                members = part[groups == g]
                for start in range(0, members.size, 1024):
                    batch = unique.get_batch(members[start:start + 1024])
                    for j in range(len(batch["trajectory"])):
                        writer.add({k: v[j] for k, v in batch.items()})
    return picks


def write_build(out: Path, args: dict, fn: Callable, items: Iterable, run_ids: list[str],
                 cells: list[tuple[str, int, int]], per_cell_strata: bool, *, workers: int,
                 fractions: tuple[float, ...], seed: int, max_factor: float, force: bool, verbose: bool, intro: str,
                 extra: dict | None = None) -> dict:
    """Run ``fn`` over ``items`` (trajectory ``i`` gives ``(record, samples, cpu, counts)``), write the
    stores, balance train, write ``build.json`` last. ``extra`` + the summed counts -> ``summary["import"]``."""
    say = print if verbose else (lambda *a, **k: None)
    with file_lock(out / ".build.lock"):  # two builders of one directory would clobber each other
        if (out / "build.json").exists():
            if not force:
                raise FileExistsError(f"{out}: holds a finished build (build.json); pass force=True to rebuild it")
            (out / "build.json").unlink()  # from here on the directory counts as unfinished
        _clear(out)
        start = time.perf_counter()
        strata = cells if per_cell_strata else [c[0] for c in cells]  # too few per cell: per pattern
        parts = group_split(run_ids, fractions, seed=seed, strata=strata)
        split_of = {int(i): name for name, idx in zip(SPLITS, parts) for i in idx}
        write_json_atomic(out / "splits.json", {name: [run_ids[i] for i in idx] for name, idx in zip(SPLITS, parts)})
        say(f"{intro} with {workers} worker(s) into {out}")
        stats = {c: {"trajectories": 0, "initial": 0, "final": 0, "cpu_seconds": 0.0, "improving": 0,
                     "inverse_improving": 0.0, **dict.fromkeys(SPLITS, 0)} for c in cells}
        layers, shapes, counts = [], [], Counter()
        paths = {"train": out / ".train_unique", "val": out / "val", "test": out / "test"}
        writers = {k: GroupedStoreWriter(p, group_key="state", spatial_fields=SPATIAL, overwrite=True)
                   for k, p in paths.items()}
        try:
            with open(out / "trajectories.jsonl.tmp", "w") as jsonl:
                for i, (record, samples, cpu, more) in enumerate(results_in_order(fn, items, workers)):
                    if record["run_id"] != run_ids[i]:
                        raise RuntimeError(f"{run_ids[i]!r} expected, got {record['run_id']!r} (the input changed)")
                    jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")
                    counts.update(more)
                    split, (_, height, width) = split_of[i], cells[i]
                    row = stats[cells[i]]
                    row["trajectories"] += 1
                    row["initial"] += record["initial_crossings"]
                    row["final"] += record["final_crossings"]
                    row["cpu_seconds"] += cpu
                    n = len(samples["crossings"])
                    row[split] += n
                    codes = samples["ops"]
                    improving = ((codes != 0) & (codes % 16 < 8)).sum((1, 2, 3))  # delta < 0
                    row["improving"] += int(improving.sum())
                    row["inverse_improving"] += float((1.0 / np.maximum(improving, 1)).sum())
                    for j in range(n):
                        writers[split].add({**{k: v[j] for k, v in samples.items()},
                                            "initial_crossings": np.int64(record["initial_crossings"]),
                                            "trajectory": record["run_id"], "zone_pattern": record["zone_pattern"]})
                    if split == "train":
                        y, x = samples["target"][:, 0], samples["target"][:, 1]
                        layers.extend(layer_index(y, x, height, width).tolist())
                        shapes.extend([(height, width)] * n)
                    done = i + 1
                    if verbose and (done % max(1, len(run_ids) // 10) == 0 or done == len(run_ids)):
                        say(f"  {done}/{len(run_ids)} trajectories, {time.perf_counter() - start:.0f} s")
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()  # no-op for the ones already closed
            raise
        os.replace(out / "trajectories.jsonl.tmp", out / "trajectories.jsonl")
        picks = _balance_train(paths["train"], out / "train", layers, shapes, max_factor, seed)
        shutil.rmtree(paths["train"])
        summary = _summary(out, args, workers, stats, layers, picks, time.perf_counter() - start)
        if extra is not None:
            summary["import"] = {**extra, **{k: int(counts[k]) for k in
                                             ("applied_ops", "noop_ops", "skipped_ops", "initial_mismatch")}}
        say(format_table(summary))
        write_json_atomic(out / "build.json", summary)  # last: its presence means "finished"
    return summary


def _summary(out: Path, args: dict, workers: int, stats: dict, layers: list[int], picks: np.ndarray,
             seconds: float) -> dict:
    rows = []
    for (pattern, h, w), s in sorted(stats.items()):
        t = max(s["trajectories"], 1)
        n = max(sum(s[k] for k in SPLITS), 1)
        rows.append({"zone_pattern": pattern, "height": h, "width": w, "trajectories": s["trajectories"],
                     "samples": sum(s[k] for k in SPLITS), **{k: s[k] for k in SPLITS},
                     "initial_crossings": s["initial"] / t, "final_crossings": s["final"] / t,
                     "improving_per_state": s["improving"] / n, "teacher_ceiling_top1": s["inverse_improving"] / n})
    stores = {k: GroupedStore(out / k, verify=False) for k in SPLITS}
    counts = {k: len(v) for k, v in stores.items()}
    store_bytes = sum(v.nbytes for v in stores.values())
    stored = sum(counts.values())
    lay = np.asarray(layers, dtype=np.int64)
    return {"format": "blockyard.fusion-dataset", "version": VERSION, "args": args, "workers": workers,
            "seconds": round(seconds, 2), "worker_cpu_seconds": round(sum(s["cpu_seconds"] for s in stats.values()), 2),
            "trajectories": sum(r["trajectories"] for r in rows),
            "samples": {**counts, "train_unique": len(layers)}, "cells": rows,
            "train_layers": {"before": np.bincount(lay).tolist() if lay.size else [],
                             "after": np.bincount(lay[picks]).tolist() if lay.size else []},
            "bytes": {"stores": store_bytes, "trajectories_jsonl": (out / "trajectories.jsonl").stat().st_size,
                      "dense_float32_9x128x128": stored * DENSE_BYTES,
                      "ratio_vs_dense": round(stored * DENSE_BYTES / max(store_bytes, 1), 1)}}


def format_table(summary: dict) -> str:
    """The build table: per pattern and size, trajectories, samples per split, teacher reduction."""
    head = (f"{'pattern':<11}{'HxW':>8}{'traj':>6}{'samples':>9}{'train':>7}{'val':>6}{'test':>6}"
            f"{'crossings initial -> final':>28}{'reduction':>10}{'improving':>10}{'1/improving':>12}")
    lines = [head, "-" * len(head)]

    def line(name: str, size: str, rows: list[dict]) -> str:
        t = sum(r["trajectories"] for r in rows)
        ini = sum(r["initial_crossings"] * r["trajectories"] for r in rows) / max(t, 1)
        fin = sum(r["final_crossings"] * r["trajectories"] for r in rows) / max(t, 1)
        n = {k: sum(r[k] for r in rows) for k in ("samples", *SPLITS)}
        per_state = {k: sum(r[k] * r["samples"] for r in rows) / max(n["samples"], 1)
                     for k in ("improving_per_state", "teacher_ceiling_top1")}
        return (f"{name:<11}{size:>8}{t:>6}{n['samples']:>9}{n['train']:>7}{n['val']:>6}{n['test']:>6}"
                f"{ini:>17.1f} -> {fin:<7.1f}{100 * (ini - fin) / max(ini, 1e-9):>9.0f}%"
                f"{per_state['improving_per_state']:>10.2f}{per_state['teacher_ceiling_top1']:>12.1%}")

    cells = summary["cells"]
    for r in cells:
        lines.append(line(r["zone_pattern"], f"{r['height']}x{r['width']}", [r]))
    lines.append("-" * len(head))
    for pattern in dict.fromkeys(r["zone_pattern"] for r in cells):
        lines.append(line(pattern, "all", [r for r in cells if r["zone_pattern"] == pattern]))
    lines.append(line("total", "all", cells))
    lines.append("improving: mean number of improving ops per stored state; 1/improving: E[1 / that number], the "
                 "top-1 ceiling of any model trained on the teacher's picks (it picks one of them uniformly)")
    s, b, lay = summary["samples"], summary["bytes"], summary["train_layers"]
    lines.append(f"train after layer balancing: {s['train']} samples ({s['train_unique']} unique, "
                 f"x{s['train'] / max(s['train_unique'], 1):.2f}); per layer {lay['before']} -> {lay['after']}")
    stored = s["train"] + s["val"] + s["test"]
    lines.append(f"bytes on disk: stores {b['stores'] / 2**20:.1f} MiB for {stored} samples "
                 f"({b['stores'] / max(stored, 1) / 1024:.2f} KiB/sample) vs dense float32 9x128x128 "
                 f"{b['dense_float32_9x128x128'] / 2**30:.2f} GiB: {b['ratio_vs_dense']:.0f}x smaller; "
                 f"trajectories.jsonl {b['trajectories_jsonl'] / 2**20:.1f} MiB")
    if "import" in summary:
        imp = summary["import"]
        lines.append(f"imported {imp['lines']} lines: {imp['skipped_no_zone_grid']} records skipped without "
                     f"zone_grid; ops applied {imp['applied_ops']}, skipped: {imp['noop_ops']} 'N' no-ops, "
                     f"{imp['skipped_ops']} that did not apply; {imp['initial_mismatch']} records whose zigzag "
                     f"start differs from their initial_crossings")
    lines.append(f"built in {summary['seconds']:.1f} s with {summary['workers']} worker(s); teacher + replay took "
                 f"{summary['worker_cpu_seconds']:.1f} s of CPU time")
    return "\n".join(lines)
