"""Build the FusionNet dataset: teacher trajectories, exact replay, grouped stores per split.

    python examples/fusion/build_data.py --out runs/fusion/data   # 560 trajectories, 1.5-3.5 min (2 shared cores)
    python examples/fusion/build_data.py --out /tmp/fusion --smoke   # a few hundred samples, seconds
    python examples/fusion/build_data.py --out runs/fusion/data --trajectories final_dataset.jsonl
    python examples/fusion/build_data.py --out DATA --sizes seed --per-cell 200 --iters-scale area --workers 32

``--trajectories FILE.jsonl`` replaces steps 1-2 by the records of a file in the seed's format
(``trajectories.py``: every line checked first, GA records without ``zone_grid`` and ``"N"`` ops
skipped, ops that do not apply skipped and counted, replayed from the zigzag); steps 3-4 are
the same, and the build table ends with what was skipped.

1. Plan one trajectory per (zone pattern, grid size, repeat). Each trajectory's seed and its zone
   parameters derive from ``(--seed, index)`` alone, so the data never depends on the number of
   workers or the order in which they finish.
2. Run the annealing teacher (``teacher.run_teacher``) and replay every record exactly
   (``teacher.replay_steps``) in a process pool. Every op that lowers the crossings yields one
   sample: the state before it (``encoding.state_channels``), the op as ``(y, x, action)``, every
   op applicable there with its crossing change (``encoding.encode_ops``: the exact set of
   improving ops, for set-valued targets and metrics), the previous effective ops as history.
   Workers return numpy arrays (the seed's workers returned torch tensors and ran out of file
   descriptors). ``--sizes seed --iters-scale area`` builds on the seed's grid sizes (up to 100x100
   in its 128 canvas) with the teacher's budget growing with the area.
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
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make `fusion` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.data import file_lock
from fusion.encoding import HISTORY, encode_ops, state_channels
from fusion.grid import ZONE_PATTERNS
from fusion.store_build import VERSION, default_workers, format_table, write_build
from fusion.teacher import replay_steps, run_teacher
from fusion.trajectories import clean_record, read_records, scan_file

__all__ = ["SEED_SIZES", "SIZES", "SMOKE_SIZES", "TrajectorySpec", "build_dataset", "build_from_trajectories",
           "ensure_dataset", "format_table", "parse_sizes", "plan_trajectories", "teacher_iters", "trajectory_samples"]

# (height, width): multiples of 8, so the 4-level U-Net pads at most 8 - 0 cells; square and not.
SIZES: tuple[tuple[int, int], ...] = ((16, 16), (16, 24), (24, 16), (24, 24), (24, 32), (32, 24), (32, 32))
SMOKE_SIZES: tuple[tuple[int, int], ...] = ((16, 16), (16, 24))
# the grid sizes of the seed's trajectory file (final_dataset.jsonl), all inside its 128x128 canvas
SEED_SIZES: tuple[tuple[int, int], ...] = ((30, 30), (30, 100), (50, 50), (60, 60), (60, 100), (80, 80), (100, 100))
MAX_SIDE = 128  # the seed's canvas, and FusionNet's default --max-grid
REFERENCE_CELLS = 32 * 32  # --iters-scale area: ``iters`` is the budget of a 32x32 grid
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


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``--sizes``: ``default`` (16x16 to 32x32), ``seed`` (the seed's 30x30 to 100x100) or ``HxW,HxW,...``."""
    named = {"default": SIZES, "seed": SEED_SIZES, "smoke": SMOKE_SIZES}
    if text in named:
        return [tuple(s) for s in named[text]]
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 for s in sizes):
        raise ValueError(f"sizes: expected 'default', 'seed' or HxW[,HxW...] (e.g. 16x16,30x100), got {text!r}")
    return sizes


def _sizes_arg(text: str) -> list[tuple[int, int]]:
    try:
        sizes = parse_sizes(text)
        _check_sizes(sizes)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return sizes


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> None:
    bad = [s for s in sizes if not (3 <= s[0] <= MAX_SIDE and 3 <= s[1] <= MAX_SIDE)]
    if bad or not sizes:
        raise ValueError(f"sizes: expected (height, width) pairs with sides in [3, {MAX_SIDE}], got {list(sizes)}")


def teacher_iters(iters: int, height: int, width: int, scale: str) -> int:
    """The teacher's iterations on an ``height x width`` grid: ``iters`` (``scale="fixed"``) or, with
    ``"area"``, ``iters`` scaled by the area beyond 32x32 (``round(iters * max(1, h * w / 1024))``):
    at a fixed budget the teacher finds nothing on large grids (3000 proposals: 0 improving ops on
    100x100 left_right and voronoi grids; 20000: 100 -> 64 and 71 -> 68 crossings)."""
    if scale not in ("fixed", "area"):
        raise ValueError(f"iters_scale: expected 'fixed' or 'area', got {scale!r}")
    return int(iters) if scale == "fixed" else round(iters * max(1.0, height * width / REFERENCE_CELLS))


def plan_trajectories(sizes: Sequence[tuple[int, int]], patterns: Sequence[str], per_cell: int, seed: int,
                      iters: int, iters_scale: str = "fixed") -> list[TrajectorySpec]:
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
                                            pattern, teacher_seed, init, num_zones, int(rng.integers(2, 5)),
                                            teacher_iters(iters, h, w, iters_scale)))
    return specs


def trajectory_samples(record: dict) -> dict[str, np.ndarray]:
    """Replay one teacher record exactly and return its samples, stacked (numpy only).

    One sample per op that lowers the crossings: ``state (n, 4, h, w) float16`` before the op,
    ``target (n, 3) int64`` = ``(y, x, action)``, ``ops (n, 3, h, w) uint8`` = every op applicable
    to that state with its crossing change (``encoding.encode_ops``; the teacher's pick is one of
    its improving ops), ``history (n, 32, 5) float32`` = the previous effective ops
    ``(action, y, x, crossings before, crossings after)`` (raw counts, oldest first, the last 32,
    zero padded), ``history_len (n,)`` and ``crossings (n,)`` (before the op).
    """
    h, w = int(record["grid_H"]), int(record["grid_W"])
    zones = np.asarray(record["zone_grid"], dtype=np.int64).reshape(h, w)
    states, targets, op_sets, histories, lengths, crossings = [], [], [], [], [], []
    past: deque[tuple[int, int, int, int, int]] = deque(maxlen=HISTORY)
    for step in replay_steps(record, candidates=True):
        if step.crossings_after >= step.crossings_before:
            continue
        v, y, x = step.op
        hist = np.zeros((HISTORY, 5), dtype=np.float32)
        if past:
            hist[:len(past)] = past
        states.append(state_channels(zones, step.H, step.V))
        pool = step.candidates
        op_sets.append(encode_ops(pool.variant, pool.y, pool.x, pool.delta, h, w))
        targets.append((y, x, v))
        histories.append(hist)
        lengths.append(len(past))
        crossings.append(step.crossings_before)
        past.append((v, y, x, step.crossings_before, step.crossings_after))
    n = len(states)
    return {"state": np.stack(states) if n else np.zeros((0, 4, h, w), dtype=np.float16),
            "target": np.asarray(targets, dtype=np.int64).reshape(n, 3),
            "ops": np.stack(op_sets) if n else np.zeros((0, 3, h, w), dtype=np.uint8),
            "history": np.stack(histories) if n else np.zeros((0, HISTORY, 5), dtype=np.float32),
            "history_len": np.asarray(lengths, dtype=np.int64),
            "crossings": np.asarray(crossings, dtype=np.int64)}


def _run(spec: TrajectorySpec) -> tuple[dict, dict[str, np.ndarray], float, dict[str, int]]:
    cpu = time.process_time()
    record = run_teacher(spec.width, spec.height, spec.zone_pattern, spec.seed, iters=spec.iters,
                         init_pattern=spec.init_pattern, num_zones=spec.num_zones, num_islands=spec.num_islands,
                         run_id=spec.run_id)
    samples = trajectory_samples(record)
    return record, samples, time.process_time() - cpu, {}  # CPU time: meaningful on a shared machine


def _import(item: tuple[int, dict]) -> tuple[dict, dict[str, np.ndarray], float, dict[str, int]]:
    cpu = time.process_time()
    record, counts = clean_record(item[1], item[0])
    samples = trajectory_samples(record)
    return record, samples, time.process_time() - cpu, {
        "applied_ops": counts.applied, "noop_ops": counts.noop, "skipped_ops": counts.not_applied,
        "initial_mismatch": int(counts.initial_mismatch)}


def build_dataset(out: str | os.PathLike, *, smoke: bool = False, workers: int | None = None, seed: int = 0,
                  sizes: Sequence[tuple[int, int]] | None = None, patterns: Sequence[str] = ZONE_PATTERNS,
                  per_cell: int | None = None, iters: int | None = None, iters_scale: str = "fixed",
                  fractions: Sequence[float] | None = None, max_factor: float = 4.0, force: bool = False,
                  verbose: bool = True) -> dict:
    """Build the dataset into ``out`` (see the module docstring) and return the summary.

    Args:
        out: dataset directory (created).
        smoke: tiny defaults (2 sizes, 3 trajectories per cell, 1500 teacher iterations, 60/20/20).
        workers: process-pool size (default: the CPUs this process may use; 1 = in-process).
        seed: base seed; trajectory ``i`` uses ``SeedSequence([seed, i])``.
        sizes: ``(height, width)`` grid sizes, sides 3 to 128 (:data:`SIZES`; :data:`SEED_SIZES` are
            the seed's); patterns: zone patterns; per_cell: trajectories per (pattern, size); iters:
            teacher iterations; iters_scale: ``"fixed"`` or ``"area"`` (:func:`teacher_iters`);
            fractions: train/val/test trajectory shares.
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
    workers = int(workers or default_workers())
    if len(fractions) != 3:
        raise ValueError(f"fractions: expected (train, val, test), got {fractions}")
    _check_sizes(sizes)
    teacher_iters(iters, 3, 3, iters_scale)  # checks the name before any work
    unknown = [p for p in patterns if p not in ZONE_PATTERNS]
    if unknown:
        raise ValueError(f"patterns: expected a subset of {ZONE_PATTERNS}, got {list(patterns)}")
    args = {"smoke": bool(smoke), "seed": int(seed), "sizes": [list(s) for s in sizes], "patterns": list(patterns),
            "per_cell": per_cell, "iters": iters, "iters_scale": iters_scale, "fractions": list(fractions),
            "max_factor": float(max_factor)}
    specs = plan_trajectories(sizes, patterns, per_cell, seed, iters, iters_scale)
    cells = [(s.zone_pattern, s.height, s.width) for s in specs]
    intro = f"building {len(specs)} trajectories ({len(sizes)} sizes x {len(patterns)} patterns x {per_cell})"
    return write_build(Path(out), args, _run, specs, [s.run_id for s in specs], cells, per_cell >= 10,
                       workers=workers, fractions=fractions, seed=seed, max_factor=max_factor, force=force,
                       verbose=verbose, intro=intro)


def build_from_trajectories(out: str | os.PathLike, trajectories: str | os.PathLike, *, workers: int | None = None,
                            seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1), max_factor: float = 4.0,
                            force: bool = False, verbose: bool = True) -> dict:
    """Build the same dataset as :func:`build_dataset` from a trajectory file in the seed's JSONL format.

    Every line is checked first (``trajectories.scan_file``: a malformed line raises a ``ValueError``
    naming the file and the line, before anything is written). Each usable record is replayed from
    the zigzag as the seed's builder did (``trajectories.clean_record``: ``"N"`` ops and ops that do
    not apply are skipped and counted), then exactly as a teacher record: one sample per op that
    lowers the crossings. Split by trajectory (stratified by pattern and size when every cell has
    10 or more trajectories, else by pattern), train-only layer balancing, the same stores;
    ``trajectories.jsonl`` holds the cleaned records. The summary's ``"import"`` entry counts the
    records skipped without ``zone_grid``, the ``"N"`` ops, the ops that did not apply, and the
    records whose zigzag start differs from their ``initial_crossings``.
    """
    scan = scan_file(trajectories)
    fractions = tuple(float(f) for f in fractions)
    workers = int(workers or default_workers())
    if len(fractions) != 3:
        raise ValueError(f"fractions: expected (train, val, test), got {fractions}")
    if not scan.entries:
        raise ValueError(f"trajectories: {scan.path} holds no record with a zone_grid ({scan.lines} lines)")
    args = {"trajectories": str(Path(trajectories).resolve()), "sha256": scan.sha256, "seed": int(seed),
            "fractions": list(fractions), "max_factor": float(max_factor)}
    cells = [(pattern, h, w) for _, _, pattern, h, w in scan.entries]
    wanted = {e[0] for e in scan.entries}
    items = ((line, rec) for line, rec in read_records(trajectories) if line in wanted)
    intro = (f"importing {len(scan.entries)} trajectories of {scan.path} ({scan.lines} lines, "
             f"{scan.skipped_no_zone_grid} skipped without zone_grid)")
    return write_build(Path(out), args, _import, items, [e[1] for e in scan.entries], cells,
                       min(Counter(cells).values()) >= 10, workers=workers, fractions=fractions, seed=seed,
                       max_factor=max_factor, force=force, verbose=verbose, intro=intro,
                       extra={"lines": scan.lines, "skipped_no_zone_grid": scan.skipped_no_zone_grid})


def ensure_dataset(out: str | os.PathLike, *, smoke: bool = False, workers: int | None = None,
                   trajectories: str | os.PathLike | None = None, **kwargs) -> Path:
    """Return ``out``, building the dataset first unless ``out/build.json`` says it is finished.

    With ``trajectories`` (a file in the seed's JSONL format) the dataset is built from it
    (:func:`build_from_trajectories`), and a finished build in ``out`` must come from a file with
    the same content (sha256), else ``ValueError``. Under DDP call it on rank 0 only and let the
    other ranks wait at a barrier. Concurrent callers in separate processes are serialised by a
    lock file, and the later ones find the finished build. A finished build made with other
    arguments is kept (never silently overwritten): rebuild it with ``force=True``.
    """
    out = Path(out)
    with file_lock(out / ".build.lock"):  # two builders of one directory would clobber each other
        finished = (out / "build.json").exists()
    if not finished:
        try:
            if trajectories is not None:
                build_from_trajectories(out, trajectories, workers=workers, **kwargs)
            else:
                build_dataset(out, smoke=smoke, workers=workers, **kwargs)
        except FileExistsError:
            if not (out / "build.json").exists():
                raise
            # another process finished it while we waited for the lock
    version = json.loads((out / "build.json").read_text()).get("version")
    if version != VERSION:
        raise ValueError(f"data: {out} holds a dataset of build format version {version}, expected {VERSION} (every "
                         f"sample with its op set); rebuild it (build_data.py --force) or use another data directory")
    if trajectories is not None:
        built = json.loads((out / "build.json").read_text())["args"].get("sha256")
        wanted = scan_file(trajectories).sha256
        if built != wanted:
            raise ValueError(f"trajectories: {out} holds a dataset built from "
                             f"{'another file' if built else 'the teacher'}, not from {trajectories} (sha256 "
                             f"{wanted[:12]}...); use another data directory or rebuild it (build_data.py --force)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fusion/data"))
    parser.add_argument("--smoke", action="store_true", help="a few hundred samples, seconds")
    parser.add_argument("--workers", type=int, default=None, help="process pool size (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-cell", type=int, default=None, help="trajectories per (pattern, size) (default 20)")
    parser.add_argument("--sizes", type=_sizes_arg, default=None,
                        help="grid sizes: 'default' (16x16 to 32x32), 'seed' (the seed's 30x30 to 100x100) or "
                             f"HxW[,HxW...], sides 3 to {MAX_SIDE}")
    parser.add_argument("--iters", type=int, default=None, help="teacher iterations per trajectory (default 3000)")
    parser.add_argument("--iters-scale", choices=("fixed", "area"), default="fixed",
                        help="'area': iterations grow with the grid area beyond 32x32 (iters * h * w / 1024)")
    parser.add_argument("--force", action="store_true", help="rebuild a finished build")
    parser.add_argument("--trajectories", type=Path, default=None, metavar="FILE.jsonl",
                        help="build from this trajectory file (the seed's JSONL format) instead of the teacher")
    args = parser.parse_args(argv)
    try:
        if args.trajectories is not None:
            build_from_trajectories(args.out, args.trajectories, workers=args.workers, seed=args.seed, force=args.force)
        else:
            build_dataset(args.out, smoke=args.smoke, workers=args.workers, seed=args.seed, sizes=args.sizes,
                          per_cell=args.per_cell, iters=args.iters, iters_scale=args.iters_scale, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        parser.exit(1, f"{err}\n")


if __name__ == "__main__":
    main()
