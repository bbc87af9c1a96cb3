"""Build the design-decomposition dataset: generate, render, score, split, store with checksums.

    python examples/design/build_data.py --out runs/design/data               # 20,000 designs at 64x64, ~1 min
    python examples/design/build_data.py --out /tmp/design --smoke            # 600 designs, seconds
    python examples/design/build_data.py --out runs/design/data256 --size 256 --designs 5000

1. Split the design indices ``0 .. designs-1`` at random (``group_split``, one group per design,
   seeded): train / val / test, 0.8 / 0.1 / 0.1 by default. Design ``i`` is
   ``generator.sample_design(seed, i)`` wherever it is computed, so the data never depend on
   the number of workers.
2. In chunks (a spawn-context process pool when ``workers > 1``): generate, render
   (``render.render``), score (``grammar.grammar_scores`` on the ground truth) and read back
   the latents (``generator.design_latents``).
3. Drop any design whose rendered image equals an earlier one (counted in the summary; a
   continuous jitter makes this essentially never happen), so no image is in two splits.
4. Stream each split into a ``GroupedStoreWriter`` (``dataset.FIELDS``; sha256 per file in the
   store's index), then write ``build.json`` last, atomically: its presence means "finished".
   A directory without it is cleared and rebuilt; a finished one is returned as is when the
   settings match and never overwritten when they differ.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `design` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.data import GroupedStore, GroupedStoreWriter, file_lock, group_split, write_json_atomic
from design.ceiling import bayes_ceiling
from design.dataset import FIELDS, FORMAT, SPLITS, read_summary
from design.generator import design_latents, sample_designs
from design.grammar import grammar_scores
from design.render import render
from design.vocab import FORMATS, GOALS, GRAMMAR_NAMES, HIERARCHY_SCALE

__all__ = ["build", "format_table", "main", "make_samples"]

VERSION = 1
CHUNK = 250  # designs per task: bounded memory (about 10 MB at 64 px), enough tasks to balance 2 workers


def make_samples(seed: int, start: int, count: int, size: int) -> dict[str, np.ndarray]:
    """Designs ``start .. start+count-1`` as stored arrays (``dataset.FIELDS``), first dim ``count``."""
    designs = sample_designs(count, seed=seed, start=start)
    r = render(designs, size)
    grammar = grammar_scores(r.image, r.structure())
    latents = [design_latents(d) for d in designs]
    return {"image": r.image.numpy(), "masks": torch.stack([r.text_mask, r.image_mask], dim=1).numpy(),
            "color": r.color.to(torch.uint8).numpy(),
            "hierarchy": (r.hierarchy * HIERARCHY_SCALE).round().to(torch.uint8).numpy(),
            "goal": np.array([z.goal for z in latents], np.int64),
            "format": np.array([z.format for z in latents], np.int64),
            "tone": np.array([z.tone for z in latents], np.float32), "grammar": grammar.numpy().astype(np.float32),
            "latents": np.array([z.revealed() for z in latents], np.int64).reshape(count, -1),
            "index": np.arange(start, start + count, dtype=np.int64)}


def _task(seed: int, start: int, count: int, size: int) -> tuple[dict[str, np.ndarray], float]:
    tic = time.perf_counter()
    return make_samples(seed, start, count, size), time.perf_counter() - tic


def _init_worker() -> None:
    torch.set_num_threads(1)  # one worker per core; intra-op threads would oversubscribe


def _chunks(seed: int, designs: int, size: int, workers: int) -> Iterator[tuple[dict[str, np.ndarray], float]]:
    starts = list(range(0, designs, CHUNK))
    args = ([seed] * len(starts), starts, [min(CHUNK, designs - s) for s in starts], [size] * len(starts))
    if workers <= 1:
        # One intra-op thread, restored after: these are many small ops, and with two threads on a
        # busy 2-core machine the build took 9x longer (913 s instead of 103 s of work).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from map(_task, *args)
        finally:
            torch.set_num_threads(threads)
        return
    # spawn: no inherited torch/OpenMP thread state; children re-import this module by name.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        yield from pool.map(_task, *args)


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _clear(out: Path) -> None:
    """Remove what an unfinished build may have left (only our own names)."""
    for name in (*SPLITS, "build.json.tmp"):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for path in out.glob(".*.tmp-*"):  # GroupedStoreWriter's temporary directories
        shutil.rmtree(path, ignore_errors=True)


def _check(designs: int, size: int, seed: int, workers: int, fractions: Sequence[float]) -> None:
    for name, value, low in (("designs", designs, 3), ("size", size, 32), ("seed", seed, 0), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions: expected three positive (train, val, test) shares summing to 1, got {fractions}")


def _stats(grammar: dict[str, list[np.ndarray]], counts: dict[str, dict[str, np.ndarray]]) -> dict:
    scores = {k: np.concatenate(v) if v else np.zeros((0, len(GRAMMAR_NAMES))) for k, v in grammar.items()}
    train_mean = scores["train"].mean(axis=0)
    return {"grammar": {k: {"mean": v.mean(axis=0).round(4).tolist(), "std": v.std(axis=0).round(4).tolist()}
                        for k, v in scores.items()},
            "grammar_train_mean_mae_val": np.abs(scores["val"] - train_mean).mean(axis=0).round(4).tolist(),
            "counts": {k: {name: c.tolist() for name, c in v.items()} for k, v in counts.items()}}


def build(out: str | os.PathLike, designs: int = 20_000, size: int = 64, seed: int = 0, workers: int = 1,
          fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict:
    """Build the dataset into ``out`` (see the module docstring) and return the summary (``build.json``).

    Args:
        out: dataset directory (created); ``out/{train,val,test}`` are ``GroupedStore`` folders
            read by ``dataset.open_split``.
        designs: number of designs drawn (indices ``0 .. designs-1``).
        size: rendering size in pixels (square); 64 is the CPU default, 256 the seed's.
        seed: generator seed; also seeds the split.
        workers: processes rendering and scoring (1 = in-process); the data do not depend on it.
        fractions: train, val, test shares of the designs.

    Raises ``ValueError`` naming ``out`` if it holds a finished build made with other settings.
    """
    fractions = tuple(float(f) for f in fractions)
    _check(designs, size, seed, workers, fractions)
    out = Path(out)
    settings = {"designs": int(designs), "size": int(size), "seed": int(seed), "fractions": list(fractions)}
    parts = group_split(np.arange(designs), fractions, seed=seed)
    split_of = np.empty(designs, dtype=np.int64)
    for k, idx in enumerate(parts):
        split_of[idx] = k
    with file_lock(out / ".build.lock"):  # two builders of one directory would clobber each other
        if (out / "build.json").exists():
            summary = read_summary(out)
            if summary.get("settings") != settings:
                raise ValueError(f"out: {out} holds a finished build with other settings "
                                 f"({summary.get('settings')}, requested {settings}); use another directory")
            return summary
        _clear(out)
        tic = time.perf_counter()
        writers = {k: GroupedStoreWriter(out / k, group_key="image", spatial_fields=("image", "masks", "color",
                                                                                     "hierarchy")) for k in SPLITS}
        seen: dict[bytes, int] = {}
        duplicates, worker_seconds = 0, 0.0
        grammar: dict[str, list[np.ndarray]] = {k: [] for k in SPLITS}
        counts = {k: {"goal": np.zeros(len(GOALS), np.int64), "format": np.zeros(len(FORMATS), np.int64)}
                  for k in SPLITS}
        try:
            for arrays, seconds in _chunks(int(seed), int(designs), int(size), int(workers)):
                worker_seconds += seconds
                for j, index in enumerate(arrays["index"].tolist()):
                    key = hashlib.blake2b(arrays["image"][j].tobytes(), digest_size=16).digest()
                    if seen.setdefault(key, index) != index:
                        duplicates += 1
                        continue
                    split = SPLITS[split_of[index]]
                    writers[split].add({name: arrays[name][j] for name in FIELDS})
                    grammar[split].append(arrays["grammar"][j:j + 1])
                    counts[split]["goal"][arrays["goal"][j]] += 1
                    counts[split]["format"][arrays["format"][j]] += 1
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()  # no-op for the ones already closed
            raise
        stores = {k: GroupedStore(out / k, verify=False) for k in SPLITS}
        summary = {"format": FORMAT, "version": VERSION, "settings": settings, "workers": int(workers),
                   "samples": {k: len(v) for k, v in stores.items()}, "duplicates_dropped": duplicates,
                   "bytes": sum(v.nbytes for v in stores.values()), "seconds": round(time.perf_counter() - tic, 2),
                   "worker_seconds": round(worker_seconds, 2), "ceiling": bayes_ceiling()._asdict(),
                   **_stats(grammar, counts)}
        write_json_atomic(out / "build.json", summary)  # last: its presence means "finished"
    return summary


def format_table(summary: dict) -> str:
    """Samples per split, grammar score statistics, the Bayes ceilings and the build time."""
    lines = [f"{'split':<7}{'designs':>9}" + "".join(f"{n:>12}" for n in GRAMMAR_NAMES) + "   (mean +- std)"]
    for k in SPLITS:
        g = summary["grammar"][k]
        lines.append(f"{k:<7}{summary['samples'][k]:>9}"
                     + "".join(f"{m:>6.3f}+-{s:<4.3f}" for m, s in zip(g["mean"], g["std"])))
    mae = summary["grammar_train_mean_mae_val"]
    lines.append(f"{'val MAE of the train mean':<16}" + "".join(f"{v:>12.4f}" for v in mae))
    c = summary["ceiling"]
    lines.append(f"Bayes ceiling: goal {c['goal_accuracy']:.4f} (chance {c['goal_chance']:.2f}, majority "
                 f"{c['goal_majority']:.2f}), format {c['format_accuracy']:.4f} (chance {c['format_chance']:.2f}, "
                 f"majority {c['format_majority']:.2f}), tone MSE {c['tone_mse']:.4f} "
                 f"(variance {c['tone_variance']:.4f})")
    lines.append(f"{sum(summary['samples'].values())} designs at {summary['settings']['size']} px, "
                 f"{summary['duplicates_dropped']} duplicate images dropped, {summary['bytes'] / 2**20:.0f} MiB, "
                 f"built in {summary['seconds']:.1f} s with {summary['workers']} worker(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/design/data"))
    parser.add_argument("--designs", type=int, default=None, help="designs drawn (default 20000; --smoke 600)")
    parser.add_argument("--size", type=int, default=64, help="rendering size in pixels (the seed used 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help="processes rendering and scoring (default: the CPUs this process may use)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--smoke", action="store_true", help="600 designs")
    args = parser.parse_args(argv)
    designs = args.designs or (600 if args.smoke else 20_000)
    fractions = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    try:
        summary = build(args.out, designs=designs, size=args.size, seed=args.seed, workers=args.workers,
                        fractions=fractions)
    except ValueError as err:
        parser.exit(1, f"{err}\n")
    print(format_table(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
