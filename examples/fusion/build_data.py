"""Build the FusionNet dataset: teacher trajectories, exact replay, grouped stores per split.

    python examples/fusion/build_data.py --out runs/fusion/data   # 560 trajectories, 1.5-3.5 min (2 shared cores)
    python examples/fusion/build_data.py --out /tmp/fusion --smoke   # a few hundred samples, seconds

1. Plan one trajectory per (zone pattern, grid size, repeat). Each trajectory's seed and its zone
   parameters derive from ``(--seed, index)`` alone, so the data never depends on the number of
   workers or the order in which they finish.
2. Run the annealing teacher (``teacher.run_teacher``) and replay every record exactly
   (``teacher.replay_steps``) in a process pool. Every op that lowers the crossings yields one
   sample: the state before it (``encoding.state_channels``), the op as ``(y, x, action)``, the
   previous effective ops as history. Workers return numpy arrays (the seed's workers returned
   torch tensors and ran out of file descriptors).
3. Split BY TRAJECTORY (stratified by pattern and size), stream the samples into one
   ``GroupedStoreWriter`` per split (bounded memory), then oversample inner layers of the
   training split only (``balanced_indices`` on the target's ``layer_index``, at most 4x).
4. Print the summary table and write ``build.json`` last, atomically: its presence means the
   build finished. A directory without it is rebuilt, never trusted; a finished one is only
   rebuilt with ``--force``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make `fusion` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.data import (
    GroupedStore,
    GroupedStoreWriter,
    balanced_indices,
    file_lock,
    group_split,
    layer_index,
    write_json_atomic,
)
from fusion.encoding import HISTORY, state_channels
from fusion.grid import ZONE_PATTERNS
from fusion.teacher import replay_steps, run_teacher

__all__ = ["SIZES", "SMOKE_SIZES", "TrajectorySpec", "build_dataset", "ensure_dataset", "format_table",
           "plan_trajectories", "trajectory_samples"]

# (height, width): multiples of 8, so the 4-level U-Net pads at most 8 - 0 cells; square and not.
SIZES: tuple[tuple[int, int], ...] = ((16, 16), (16, 24), (24, 16), (24, 24), (24, 32), (32, 24), (32, 32))
SMOKE_SIZES: tuple[tuple[int, int], ...] = ((16, 16), (16, 24))
SPLITS = ("train", "val", "test")
DENSE_BYTES = 9 * 128 * 128 * 4  # the seed's padded float32 model input per sample
_DEFAULTS = {False: {"per_cell": 20, "iters": 3000, "fractions": (0.8, 0.1, 0.1)},
             True: {"per_cell": 3, "iters": 1500, "fractions": (0.6, 0.2, 0.2)}}


class TrajectorySpec(NamedTuple):
    """Everything ``run_teacher`` needs for one trajectory (plain values: picklable, JSON-able)."""

    index: int
    run_id: str
    height: int
    width: int
    zone_pattern: str
    seed: int
    init_pattern: str
    num_zones: int
    num_islands: int
    iters: int


def plan_trajectories(sizes: Sequence[tuple[int, int]], patterns: Sequence[str], per_cell: int, seed: int,
                      iters: int) -> list[TrajectorySpec]:
    """One spec per (repeat, size, pattern), cells interleaved so any prefix covers every cell.

    Diversity within a cell (drawn from ``SeedSequence([seed, index])``): 3-5 voronoi sites,
    3-4 stripes, 2-4 islands, and a horizontal or vertical zigzag start for voronoi and islands.
    ``left_right`` and vertical stripes always start on the horizontal zigzag: on the vertical
    one they are already optimal (nothing to learn).
    """
    specs = []
    for _ in range(per_cell):
        for h, w in sizes:
            for pattern in patterns:
                index = len(specs)
                ss = np.random.SeedSequence([seed, index])
                teacher_seed = int(ss.generate_state(1)[0])
                rng = np.random.default_rng(ss.spawn(1)[0])
                num_zones = {"voronoi": int(rng.integers(3, 6)), "stripes": int(rng.integers(3, 5))}.get(pattern, 2)
                init = "vertical_zigzag" if pattern in ("voronoi", "islands") and rng.random() < 0.5 else "zigzag"
                specs.append(TrajectorySpec(index, f"sa_{index:05d}_W{w}H{h}_{pattern}_seed{teacher_seed}", h, w,
                                            pattern, teacher_seed, init, num_zones, int(rng.integers(2, 5)), iters))
    return specs


def trajectory_samples(record: dict) -> dict[str, np.ndarray]:
    """Replay one teacher record exactly and return its samples, stacked (numpy only).

    One sample per op that lowers the crossings: ``state (n, 4, h, w) float16`` before the op,
    ``target (n, 3) int64`` = ``(y, x, action)``, ``history (n, 32, 5) float32`` = the previous
    effective ops ``(action, y, x, crossings before, crossings after)`` (raw counts, oldest
    first, the last 32, zero padded), ``history_len (n,)`` and ``crossings (n,)`` (before the op).
    """
    h, w = int(record["grid_H"]), int(record["grid_W"])
    zones = np.asarray(record["zone_grid"], dtype=np.int64).reshape(h, w)
    states, targets, histories, lengths, crossings = [], [], [], [], []
    past: deque[tuple[int, int, int, int, int]] = deque(maxlen=HISTORY)
    for step in replay_steps(record):
        if step.crossings_after >= step.crossings_before:
            continue
        v, y, x = step.op
        hist = np.zeros((HISTORY, 5), dtype=np.float32)
        if past:
            hist[:len(past)] = past
        states.append(state_channels(zones, step.H, step.V))
        targets.append((y, x, v))
        histories.append(hist)
        lengths.append(len(past))
        crossings.append(step.crossings_before)
        past.append((v, y, x, step.crossings_before, step.crossings_after))
    n = len(states)
    return {"state": np.stack(states) if n else np.zeros((0, 4, h, w), dtype=np.float16),
            "target": np.asarray(targets, dtype=np.int64).reshape(n, 3),
            "history": np.stack(histories) if n else np.zeros((0, HISTORY, 5), dtype=np.float32),
            "history_len": np.asarray(lengths, dtype=np.int64),
            "crossings": np.asarray(crossings, dtype=np.int64)}


def _run(spec: TrajectorySpec) -> tuple[dict, dict[str, np.ndarray], float]:
    cpu = time.process_time()
    record = run_teacher(spec.width, spec.height, spec.zone_pattern, spec.seed, iters=spec.iters,
                         init_pattern=spec.init_pattern, num_zones=spec.num_zones, num_islands=spec.num_islands,
                         run_id=spec.run_id)
    samples = trajectory_samples(record)
    return record, samples, time.process_time() - cpu  # CPU time: meaningful on a shared machine


def _results(specs: list[TrajectorySpec], workers: int) -> Iterator[tuple[dict, dict[str, np.ndarray], float]]:
    """Results in spec order; at most ``4 * workers`` in flight, so memory stays bounded."""
    if workers <= 1:
        yield from map(_run, specs)
        return
    # fork: workers inherit the imports (torch takes seconds to import on a loaded box) and
    # only run numpy code, so no OpenMP/torch thread state is used after the fork.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        todo, pending = iter(specs), deque()
        for spec in todo:
            pending.append(pool.apply_async(_run, (spec,)))
            if len(pending) >= 4 * workers:
                break
        while pending:
            result = pending.popleft().get()
            spec = next(todo, None)
            if spec is not None:
                pending.append(pool.apply_async(_run, (spec,)))
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


def _default_workers() -> int:
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
    with GroupedStoreWriter(out, group_key="state", spatial_fields=("state",), overwrite=True) as writer:
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


def build_dataset(out: str | os.PathLike, *, smoke: bool = False, workers: int | None = None, seed: int = 0,
                  sizes: Sequence[tuple[int, int]] | None = None, patterns: Sequence[str] = ZONE_PATTERNS,
                  per_cell: int | None = None, iters: int | None = None,
                  fractions: Sequence[float] | None = None, max_factor: float = 4.0, force: bool = False,
                  verbose: bool = True) -> dict:
    """Build the dataset into ``out`` (see the module docstring) and return the summary.

    Args:
        out: dataset directory (created).
        smoke: tiny defaults (2 sizes, 3 trajectories per cell, 1500 teacher iterations, 60/20/20).
        workers: process-pool size (default: the CPUs this process may use; 1 = in-process).
        seed: base seed; trajectory ``i`` uses ``SeedSequence([seed, i])``.
        sizes: ``(height, width)`` grid sizes; patterns: zone patterns; per_cell: trajectories per
            (pattern, size); iters: teacher iterations; fractions: train/val/test trajectory shares.
        max_factor: cap of the inner-layer oversampling of the training split.
        force: rebuild even if ``out`` holds a finished build.
        verbose: print progress and the summary table.

    Raises ``FileExistsError`` if ``out/build.json`` exists and ``force`` is False.
    """
    out = Path(out)
    defaults = _DEFAULTS[bool(smoke)]
    sizes = [tuple(int(v) for v in s) for s in (sizes or (SMOKE_SIZES if smoke else SIZES))]
    per_cell = int(per_cell or defaults["per_cell"])
    iters = int(iters or defaults["iters"])
    fractions = tuple(float(f) for f in (fractions or defaults["fractions"]))
    workers = int(workers or _default_workers())
    if len(fractions) != 3:
        raise ValueError(f"fractions: expected (train, val, test), got {fractions}")
    unknown = [p for p in patterns if p not in ZONE_PATTERNS]
    if unknown:
        raise ValueError(f"patterns: expected a subset of {ZONE_PATTERNS}, got {list(patterns)}")
    args = {"smoke": bool(smoke), "seed": int(seed), "sizes": [list(s) for s in sizes], "patterns": list(patterns),
            "per_cell": per_cell, "iters": iters, "fractions": list(fractions), "max_factor": float(max_factor)}
    say = print if verbose else (lambda *a, **k: None)
    with file_lock(out / ".build.lock"):  # two builders of one directory would clobber each other
        if (out / "build.json").exists():
            if not force:
                raise FileExistsError(f"{out}: holds a finished build (build.json); pass force=True to rebuild it")
            (out / "build.json").unlink()  # from here on the directory counts as unfinished
        _clear(out)
        start = time.perf_counter()
        specs = plan_trajectories(sizes, patterns, per_cell, seed, iters)
        cells = [(s.zone_pattern, s.height, s.width) for s in specs]
        strata = cells if per_cell >= 10 else [c[0] for c in cells]  # too few per cell: per pattern
        parts = group_split([s.run_id for s in specs], fractions, seed=seed, strata=strata)
        split_of = {int(i): name for name, idx in zip(SPLITS, parts) for i in idx}
        write_json_atomic(out / "splits.json", {name: [specs[i].run_id for i in idx]
                                                 for name, idx in zip(SPLITS, parts)})
        say(f"building {len(specs)} trajectories ({len(sizes)} sizes x {len(patterns)} patterns x {per_cell}) "
            f"with {workers} worker(s) into {out}")
        stats = {c: {"trajectories": 0, "initial": 0, "final": 0, "cpu_seconds": 0.0, **dict.fromkeys(SPLITS, 0)}
                 for c in cells}
        layers, shapes = [], []
        paths = {"train": out / ".train_unique", "val": out / "val", "test": out / "test"}
        writers = {k: GroupedStoreWriter(p, group_key="state", spatial_fields=("state",), overwrite=True)
                   for k, p in paths.items()}
        try:
            with open(out / "trajectories.jsonl.tmp", "w") as jsonl:
                for done, (spec, (record, samples, cpu)) in enumerate(zip(specs, _results(specs, workers)), 1):
                    jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")
                    split, cell = split_of[spec.index], cells[spec.index]
                    row = stats[cell]
                    row["trajectories"] += 1
                    row["initial"] += record["initial_crossings"]
                    row["final"] += record["final_crossings"]
                    row["cpu_seconds"] += cpu
                    n = len(samples["crossings"])
                    row[split] += n
                    for j in range(n):
                        writers[split].add({**{k: v[j] for k, v in samples.items()},
                                            "initial_crossings": np.int64(record["initial_crossings"]),
                                            "trajectory": record["run_id"], "zone_pattern": record["zone_pattern"]})
                    if split == "train":
                        y, x = samples["target"][:, 0], samples["target"][:, 1]
                        layers.extend(layer_index(y, x, spec.height, spec.width).tolist())
                        shapes.extend([(spec.height, spec.width)] * n)
                    if verbose and (done % max(1, len(specs) // 10) == 0 or done == len(specs)):
                        say(f"  {done}/{len(specs)} trajectories, {time.perf_counter() - start:.0f} s")
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
        say(format_table(summary))
        write_json_atomic(out / "build.json", summary)  # last: its presence means "finished"
    return summary


def _summary(out: Path, args: dict, workers: int, stats: dict, layers: list[int], picks: np.ndarray,
             seconds: float) -> dict:
    rows = []
    for (pattern, h, w), s in sorted(stats.items()):
        t = max(s["trajectories"], 1)
        rows.append({"zone_pattern": pattern, "height": h, "width": w, "trajectories": s["trajectories"],
                     "samples": sum(s[k] for k in SPLITS), **{k: s[k] for k in SPLITS},
                     "initial_crossings": s["initial"] / t, "final_crossings": s["final"] / t})
    stores = {k: GroupedStore(out / k, verify=False) for k in SPLITS}
    counts = {k: len(v) for k, v in stores.items()}
    store_bytes = sum(v.nbytes for v in stores.values())
    stored = sum(counts.values())
    lay = np.asarray(layers, dtype=np.int64)
    return {"format": "blockyard.fusion-dataset", "version": 1, "args": args, "workers": workers,
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
    head = (f"{'pattern':<11}{'HxW':>6}{'traj':>6}{'samples':>9}{'train':>7}{'val':>6}{'test':>6}"
            f"{'crossings initial -> final':>28}{'reduction':>10}")
    lines = [head, "-" * len(head)]

    def line(name: str, size: str, rows: list[dict]) -> str:
        t = sum(r["trajectories"] for r in rows)
        ini = sum(r["initial_crossings"] * r["trajectories"] for r in rows) / max(t, 1)
        fin = sum(r["final_crossings"] * r["trajectories"] for r in rows) / max(t, 1)
        n = {k: sum(r[k] for r in rows) for k in ("samples", *SPLITS)}
        return (f"{name:<11}{size:>6}{t:>6}{n['samples']:>9}{n['train']:>7}{n['val']:>6}{n['test']:>6}"
                f"{ini:>17.1f} -> {fin:<7.1f}{100 * (ini - fin) / max(ini, 1e-9):>9.0f}%")

    cells = summary["cells"]
    for r in cells:
        lines.append(line(r["zone_pattern"], f"{r['height']}x{r['width']}", [r]))
    lines.append("-" * len(head))
    for pattern in dict.fromkeys(r["zone_pattern"] for r in cells):
        lines.append(line(pattern, "all", [r for r in cells if r["zone_pattern"] == pattern]))
    lines.append(line("total", "all", cells))
    s, b, lay = summary["samples"], summary["bytes"], summary["train_layers"]
    lines.append(f"train after layer balancing: {s['train']} samples ({s['train_unique']} unique, "
                 f"x{s['train'] / max(s['train_unique'], 1):.2f}); per layer {lay['before']} -> {lay['after']}")
    stored = s["train"] + s["val"] + s["test"]
    lines.append(f"bytes on disk: stores {b['stores'] / 2**20:.1f} MiB for {stored} samples "
                 f"({b['stores'] / max(stored, 1) / 1024:.2f} KiB/sample) vs dense float32 9x128x128 "
                 f"{b['dense_float32_9x128x128'] / 2**30:.2f} GiB: {b['ratio_vs_dense']:.0f}x smaller; "
                 f"trajectories.jsonl {b['trajectories_jsonl'] / 2**20:.1f} MiB")
    lines.append(f"built in {summary['seconds']:.1f} s with {summary['workers']} worker(s); teacher + replay took "
                 f"{summary['worker_cpu_seconds']:.1f} s of CPU time")
    return "\n".join(lines)


def ensure_dataset(out: str | os.PathLike, *, smoke: bool = False, workers: int | None = None, **kwargs) -> Path:
    """Return ``out``, building the dataset first unless ``out/build.json`` says it is finished.

    Under DDP call it on rank 0 only and let the other ranks wait at a barrier. Concurrent
    callers in separate processes are serialised by a lock file, and the later ones find the
    finished build. A finished build made with other arguments is kept (never silently
    overwritten): rebuild it with ``build_dataset(..., force=True)``.
    """
    out = Path(out)
    with file_lock(out / ".build.lock"):  # two builders of one directory would clobber each other
        finished = (out / "build.json").exists()
    if not finished:
        try:
            build_dataset(out, smoke=smoke, workers=workers, **kwargs)
        except FileExistsError:
            if not (out / "build.json").exists():
                raise
            # another process finished it while we waited for the lock
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fusion/data"))
    parser.add_argument("--smoke", action="store_true", help="a few hundred samples, seconds")
    parser.add_argument("--workers", type=int, default=None, help="process pool size (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-cell", type=int, default=None, help="trajectories per (pattern, size)")
    parser.add_argument("--iters", type=int, default=None, help="teacher iterations per trajectory")
    parser.add_argument("--force", action="store_true", help="rebuild a finished build")
    args = parser.parse_args(argv)
    try:
        build_dataset(args.out, smoke=args.smoke, workers=args.workers, seed=args.seed, per_cell=args.per_cell,
                      iters=args.iters, force=args.force)
    except FileExistsError as err:
        parser.exit(1, f"{err}\n")


if __name__ == "__main__":
    main()
