"""Build the System A dataset: random real codes, their exact m-heights, one ShardDataset per split.

    python examples/mheight/build_data.py --out runs/mheight/data --workers 2   # 6000 codes, 21,000 rows
    python examples/mheight/build_data.py --out /tmp/mheight --smoke            # 40 codes per (n, k), seconds

1. For each (n, k) in ``NK`` draw ``codes_per_group`` parity parts ``P ~ U[-100, 100]^{k x (n-k)}``
   i.i.d. (the course's distribution, research A2-A3) from numpy's Generator seeded with
   ``SeedSequence([seed, nk_index])``, so the data never depends on the number of workers.
   ``P`` is rounded to float32, the stored precision, before its heights are computed: every
   target is the exact m-height of the matrix on disk.
2. Compute ``h_1 .. h_{n-k}`` of every code at once (``heights.mheights``, vertex enumeration),
   in a spawn-context process pool over chunks of codes. A code that is not MDS to working
   precision (never seen for continuous P) is redrawn from its group's generator, in the parent.
3. One row per (code, m), m = 2..n-k (a code gives n-k-1 rows; 21 rows per draw of all six
   (n, k)). Split BY CODE within each (n, k) (``group_split``), so the m's of a code never
   straddle splits.
4. Write ``out/{train,val,test}`` with ``write_shard`` (one shard per (n, k)): ``matrix`` = raw P
   zero-padded at the bottom and right to (6, 6) float32, ``shape`` = (k, n-k), ``side`` = (n, k, m)
   float32, ``target`` = h_m float64, extras ``group`` (index into ``GROUPS``) and ``code`` (global
   code id, ``nk_index * codes_per_group + j``), both int64. Then ``build.json`` last (atomic):
   its presence means "finished". A directory without it is cleared and rebuilt; a finished one
   is returned as is when the settings match and never overwritten when they differ.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `mheight` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.data import file_lock, group_split, write_json_atomic, write_shard
from mheight.heights import GROUPS, NK, group_index, mheights

__all__ = ["FORMAT", "HIGH", "LOW", "MAX_SHAPE", "SPLITS", "build", "format_table", "main"]

FORMAT, VERSION = "blockyard.mheight-dataset", 1
LOW, HIGH = -100.0, 100.0
MAX_SHAPE = (6, 6)  # (max k, max n-k): every P is zero-padded to this
SPLITS = ("train", "val", "test")
TASK_CODES = 250  # codes per pool task: 24 tasks for the default build, enough to balance 2 workers
MAX_REDRAWS = 100


def _init_worker() -> None:
    torch.set_num_threads(1)  # one worker per core; intra-op threads would oversubscribe


def _heights_task(nk: int, start: int, P: np.ndarray) -> tuple[int, int, np.ndarray, float]:
    tic = time.perf_counter()
    h = mheights(P, on_singular="nan").numpy()
    return nk, start, h, time.perf_counter() - tic


def _draw(rng: np.random.Generator, count: int, k: int, r: int) -> np.ndarray:
    # float32 rounding first: the heights are those of the matrices we store.
    return rng.uniform(LOW, HIGH, size=(count, k, r)).astype(np.float32).astype(np.float64)


def _tasks(codes: list[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    return [(g, s, P[s:s + TASK_CODES]) for g, P in enumerate(codes) for s in range(0, len(P), TASK_CODES)]


def _compute(codes: list[np.ndarray], workers: int) -> Iterator[tuple[int, int, np.ndarray, float]]:
    tasks = _tasks(codes)
    if workers <= 1:
        yield from (_heights_task(*t) for t in tasks)
        return
    # spawn: no inherited torch/OpenMP thread state; children re-import this module (the CLI's
    # body is behind `if __name__ == "__main__"`), and sys.path travels with the spawn data.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        yield from pool.map(_heights_task, *zip(*tasks))


def _heights(codes_per_group: int, seed: int, workers: int) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """Codes, heights and per-(n, k) stats for every group in ``NK``."""
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, g])) for g in range(len(NK))]
    codes = [_draw(rng, codes_per_group, k, n - k) for rng, (n, k) in zip(rngs, NK)]
    heights = [np.empty((codes_per_group, n - k)) for n, k in NK]
    stats = [{"n": n, "k": k, "codes": codes_per_group, "redrawn": 0, "heights_seconds": 0.0} for n, k in NK]
    for g, start, h, seconds in _compute(codes, workers):
        heights[g][start:start + len(h)] = h
        stats[g]["heights_seconds"] += seconds
    for g, (n, k) in enumerate(NK):  # in the parent, in group order: independent of workers
        for _ in range(MAX_REDRAWS):
            bad = np.flatnonzero(np.isnan(heights[g]).any(1))
            if bad.size == 0:
                break
            codes[g][bad] = _draw(rngs[g], bad.size, k, n - k)
            heights[g][bad] = mheights(codes[g][bad], on_singular="nan").numpy()
            stats[g]["redrawn"] += int(bad.size)
        else:
            raise RuntimeError(f"({n}, {k}): codes still singular after {MAX_REDRAWS} redraws")
    for s, (n, k) in zip(stats, NK):
        s["rows_per_s"] = round(codes_per_group * (n - k - 1) / max(s["heights_seconds"], 1e-9), 1)
        s["heights_seconds"] = round(s["heights_seconds"], 3)
    return codes, heights, stats


def _rows(P: np.ndarray, h: np.ndarray, ids: np.ndarray, n: int, k: int) -> dict[str, np.ndarray]:
    """One row per (code, m), m = 2..n-k, codes in the given order and m fastest."""
    r = n - k
    ms = np.arange(2, r + 1)
    reps = ms.size
    matrices = np.zeros((len(P) * reps, *MAX_SHAPE), dtype=np.float32)
    matrices[:, :k, :r] = np.repeat(P.astype(np.float32), reps, axis=0)
    side = np.stack(np.broadcast_arrays(n, k, np.tile(ms, len(P))), axis=1).astype(np.float32)
    return {"matrices": matrices, "shapes": np.tile(np.array([[k, r]], dtype=np.int64), (len(side), 1)),
            "side": side, "targets": h[:, ms - 1].reshape(-1),
            "group": np.tile([group_index(n, k, int(m)) for m in ms], len(P)).astype(np.int64),
            "code": np.repeat(ids, reps).astype(np.int64)}


def _clear(out: Path) -> None:
    """Remove what an unfinished build may have left (only our own names)."""
    for name in (*SPLITS, "build.json.tmp"):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _check(codes_per_group: int, seed: int, workers: int, val_fraction: float, test_fraction: float) -> None:
    for name, value in (("codes_per_group", codes_per_group), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}: expected in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction: expected < 1, got {val_fraction + test_fraction}")


def build(out: str | os.PathLike, codes_per_group: int = 1000, seed: int = 0, workers: int = 1,
          val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict:
    """Build the dataset into ``out`` (see the module docstring) and return the summary (``build.json``).

    Args:
        out: dataset directory (created); ``out/{train,val,test}`` are ``ShardDataset`` folders.
        codes_per_group: codes drawn per (n, k); each gives n-k-1 rows.
        seed: base seed; (n, k) number ``g`` draws from ``SeedSequence([seed, g])``.
        workers: processes computing heights (1 = in-process); the data do not depend on it.
        val_fraction, test_fraction: share of each (n, k)'s codes in val and test, each in
            (0, 1); every split must get at least one code per (n, k).

    Raises ``ValueError`` naming ``out`` if it holds a finished build made with other settings.
    """
    _check(codes_per_group, seed, workers, val_fraction, test_fraction)
    out = Path(out)
    settings = {"codes_per_group": int(codes_per_group), "seed": int(seed), "val_fraction": float(val_fraction),
                "test_fraction": float(test_fraction), "low": LOW, "high": HIGH}
    ids = np.arange(len(NK) * codes_per_group, dtype=np.int64)
    parts = group_split(ids, (1.0 - val_fraction - test_fraction, val_fraction, test_fraction), seed=seed,
                        strata=ids // codes_per_group)
    for split, idx in zip(SPLITS, parts):  # before any heavy work
        missing = sorted(set(range(len(NK))) - set((idx // codes_per_group).tolist()))
        if missing:
            raise ValueError(f"codes_per_group: {codes_per_group} codes leave split {split!r} of (n, k) = "
                             f"{NK[missing[0]]} empty; use more codes or larger fractions")
    with file_lock(out / ".build.lock"):  # two builders of one directory would clobber each other
        if (out / "build.json").exists():
            summary = json.loads((out / "build.json").read_text())
            if summary.get("format") != FORMAT or summary.get("settings") != settings:
                raise ValueError(f"out: {out} holds a finished build with other settings "
                                 f"({summary.get('settings')}, requested {settings}); use another directory")
            return summary
        _clear(out)
        tic = time.perf_counter()
        codes, heights, nk_stats = _heights(int(codes_per_group), int(seed), int(workers))
        groups = [{"group": i, "n": n, "k": k, "m": m, "rows": dict.fromkeys(SPLITS, 0)}
                  for i, (n, k, m) in enumerate(GROUPS)]
        log2h = [np.zeros(0) for _ in GROUPS]
        n_codes = {}
        for split, idx in zip(SPLITS, parts):
            n_codes[split] = int(idx.size)
            for g, (n, k) in enumerate(NK):
                local = idx[idx // codes_per_group == g] % codes_per_group
                rows = _rows(codes[g][local], heights[g][local], g * codes_per_group + local, n, k)
                write_shard(out / split, rows["matrices"], rows["side"], rows["targets"], shapes=rows["shapes"],
                            extras={"group": rows["group"], "code": rows["code"]}, name=f"n{n}_k{k}")
                for i in np.unique(rows["group"]):
                    sel = rows["group"] == i
                    groups[i]["rows"][split] += int(sel.sum())
                    if split == "train":
                        log2h[i] = np.log2(rows["targets"][sel])
        for row, values in zip(groups, log2h):
            row["log2h_mean"], row["log2h_std"] = float(values.mean()), float(values.std())
        summary = {"format": FORMAT, "version": VERSION, "settings": settings, "workers": int(workers),
                   "rows": {s: sum(g["rows"][s] for g in groups) for s in SPLITS}, "codes": n_codes,
                   "groups": groups, "nk": nk_stats, "seconds": round(time.perf_counter() - tic, 3)}
        write_json_atomic(out / "build.json", summary)  # last: its presence means "finished"
    return summary


def format_table(summary: dict) -> str:
    """Per group: rows per split, mean and std of log2 h (train), and its (n, k)'s height time."""
    nk = {(s["n"], s["k"]): s for s in summary["nk"]}
    head = (f"{'n':>3}{'k':>3}{'m':>3}{'train':>8}{'val':>7}{'test':>7}{'log2h mean':>12}{'std':>7}"
            f"{'(n,k) heights s':>17}{'rows/s':>9}")
    lines = [head, "-" * len(head)]
    for g in summary["groups"]:
        s = nk[(g["n"], g["k"])]
        lines.append(f"{g['n']:>3}{g['k']:>3}{g['m']:>3}{g['rows']['train']:>8}{g['rows']['val']:>7}"
                     f"{g['rows']['test']:>7}{g['log2h_mean']:>12.2f}{g['log2h_std']:>7.2f}"
                     f"{s['heights_seconds']:>17.2f}{s['rows_per_s']:>9.0f}")
    lines.append("-" * len(head))
    rows, codes = summary["rows"], summary["codes"]
    total = sum(rows.values())
    redrawn = sum(s["redrawn"] for s in summary["nk"])
    lines.append(f"{total} rows from {sum(codes.values())} codes (train/val/test rows {rows['train']}/{rows['val']}/"
                 f"{rows['test']}, codes {codes['train']}/{codes['val']}/{codes['test']}), {redrawn} redrawn; "
                 f"built in {summary['seconds']:.1f} s with {summary['workers']} worker(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mheight/data"))
    parser.add_argument("--codes-per-group", type=int, default=None, help="codes per (n, k) (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes computing heights")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--smoke", action="store_true", help="40 codes per (n, k)")
    args = parser.parse_args(argv)
    codes = args.codes_per_group or (40 if args.smoke else 1000)
    try:
        summary = build(args.out, codes_per_group=codes, seed=args.seed, workers=args.workers,
                        val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    except ValueError as err:
        parser.exit(1, f"{err}\n")
    print(format_table(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
