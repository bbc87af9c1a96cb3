"""Trajectory files in the seed's JSONL format: checked line by line, replayed as its builder did.

One annealing (SA) or genetic (GA) run a line::

    {"run_id": "sa_long_W30H30_seed7_...", "seed": 7, "grid_W": 30, "grid_H": 30,
     "zone_pattern": "voronoi", "initial_crossings": 41, "final_crossings": 33,
     "zone_grid": [0, 0, 1, ...], "sequence_len": 52,
     "sequence_ops": [{"kind": "T", "x": 0, "y": 3, "variant": "sr"}, ...], "runtime_sec": 21.4}

``zone_grid`` is flattened row-major (``index = y * grid_W + x``) with zone ids ``0..K-1``; an
op's ``(x, y)`` is its window's top-left cell. The file names no initial path: every run
starts on the horizontal zigzag (the seed's data was generated from it for every pattern, and its
corrected builder replays from it).

What the seed's builder skipped is skipped here, and counted:

- a record without ``zone_grid`` (or with ``null``; its GA runs) is skipped whole;
- a ``"N"`` op (a GA no-op) is skipped;
- an op that does not apply to the current state (its window leaves the grid, or the window's
  path edges are not the op's pattern) is skipped and the state stays as it was (the seed
  restored its snapshot); the replay goes on with the next op.

Anything else wrong with a line stops the reading with a :class:`TrajectoryFileError` (a
``ValueError``) that names the file and the line: text that is not a JSON object, a missing or
mistyped field, a grid under 3x3, a ``zone_grid`` of the wrong length, an op kind other than
``T``/``F``/``N``, an unknown variant, a kind that contradicts its variant, or a ``run_id`` that
repeats an earlier line's (the split is by trajectory). Blank lines are ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fusion.env import FusionEnv
from fusion.grid import count_crossings, init_path
from fusion.ops import OPS, VARIANT_MAP, VARIANTS, Op

__all__ = ["FileScan", "ImportCounts", "TrajectoryFileError", "clean_record", "format_counts", "load_trajectories",
           "parse_line", "read_records", "scan_file"]

START = "zigzag"  # the seed's initial path for every record
_FIELDS: dict[str, type] = {"run_id": str, "grid_W": int, "grid_H": int, "zone_pattern": str,
                            "initial_crossings": int, "final_crossings": int, "sequence_ops": list}


class TrajectoryFileError(ValueError):
    """A line of a trajectory file that does not follow the format (the message names file and line)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_line(text: str, path: str | os.PathLike, line: int) -> dict | None:
    """The record on one line, checked; ``None`` for a record without ``zone_grid`` (skipped).

    Raises:
        TrajectoryFileError: the line is malformed (see the module docstring); the message starts
            with ``"{path}, line {line}: "``.
    """
    def bad(why: str) -> TrajectoryFileError:
        return TrajectoryFileError(f"{path}, line {line}: {why}")

    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    for key, kind in _FIELDS.items():
        if key not in record:
            raise bad(f"missing field {key!r}")
        if not (_is_int(record[key]) if kind is int else isinstance(record[key], kind)):
            raise bad(f"{key}: expected {kind.__name__}, got {record[key]!r:.60}")
    w, h = record["grid_W"], record["grid_H"]
    if w < 3 or h < 3:
        raise bad(f"grid_W, grid_H: expected >= 3, got {w} x {h}")
    for i, op in enumerate(record["sequence_ops"]):
        where = f"sequence_ops[{i}]"
        if not isinstance(op, dict) or op.get("kind") not in ("T", "F", "N"):
            raise bad(f"{where}: expected {{kind: 'T'|'F'|'N', x, y, variant}}, got {op!r:.80}")
        if op["kind"] == "N":
            continue
        if op.get("variant") not in VARIANT_MAP:
            raise bad(f"{where}.variant: expected one of {VARIANTS}, got {op.get('variant')!r}")
        if OPS[VARIANT_MAP[op["variant"]]].kind != op["kind"]:
            raise bad(f"{where}: kind {op['kind']!r} contradicts variant {op['variant']!r}")
        if not (_is_int(op.get("x")) and _is_int(op.get("y"))):
            raise bad(f"{where}: expected integer x and y, got x={op.get('x')!r}, y={op.get('y')!r}")
    zones = record.get("zone_grid")
    if zones is None:
        return None
    if not isinstance(zones, list) or len(zones) != w * h or not all(map(_is_int, zones)):
        size = len(zones) if isinstance(zones, list) else type(zones).__name__
        raise bad(f"zone_grid: expected {w * h} (grid_W * grid_H) integers, got {size}")
    return record


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict | None]]:
    """``(line number, record or None)`` for every non-blank line, in order (streamed, 1-based lines)."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                yield line, parse_line(text, path, line)


class FileScan(NamedTuple):
    """One pass over a file: every line checked, the usable records listed (without their grids)."""

    path: str
    sha256: str
    lines: int  # non-blank lines (records)
    skipped_no_zone_grid: int
    entries: list[tuple[int, str, str, int, int]]  # (line, run_id, zone_pattern, grid_H, grid_W) per usable record


def scan_file(path: str | os.PathLike) -> FileScan:
    """Check every line of ``path`` (raises on the first malformed one, before anything is written).

    Raises:
        FileNotFoundError: no such file.
        TrajectoryFileError: a malformed line, or a ``run_id`` used twice.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    entries, skipped, lines, seen = [], 0, 0, {}
    for line, record in read_records(path):
        lines += 1
        if record is None:
            skipped += 1
            continue
        run_id = record["run_id"]
        if run_id in seen:
            raise TrajectoryFileError(f"{path}, line {line}: run_id {run_id!r} repeats line {seen[run_id]} "
                                      f"(the data is split by trajectory, so each needs its own run_id)")
        seen[run_id] = line
        entries.append((line, run_id, record["zone_pattern"], record["grid_H"], record["grid_W"]))
    return FileScan(str(path), digest.hexdigest(), lines, skipped, entries)


class ImportCounts(NamedTuple):
    """What the replay of one record skipped: ``"N"`` ops, ops that did not apply; and whether the
    zigzag start has the record's ``initial_crossings``."""

    applied: int
    noop: int
    not_applied: int
    initial_mismatch: bool


def clean_record(record: dict, line: int | None = None) -> tuple[dict, ImportCounts]:
    """Replay ``record`` from the zigzag, keeping only the ops that apply; return the cleaned record.

    The cleaned record is what this project's teacher writes, so the rest of the pipeline
    (``teacher.replay_steps``, the builder, inference) uses it unchanged: ``init_pattern`` is
    ``"zigzag"``, ``zone_grid`` is relabelled to ``0..K-1`` (order kept), ``sequence_ops`` holds the
    applied ops only (every one re-applies exactly), ``initial_crossings`` is the zigzag's count
    (the file's is kept as ``recorded_initial_crossings`` when it differs); ``final_crossings`` is
    the file's (the teacher's claim). ``source_line``, ``noop_ops`` and ``skipped_ops`` say where it
    came from and what was dropped.
    """
    w, h = record["grid_W"], record["grid_H"]
    zones = np.unique(np.asarray(record["zone_grid"], dtype=np.int64), return_inverse=True)[1].reshape(h, w)
    H, V = init_path(w, h, START)
    env = FusionEnv(zones, H, V, zone_pattern=record["zone_pattern"], init_pattern=START, check=False)
    start = count_crossings(env.H, env.V, env.zones)
    kept, noop, not_applied = [], 0, 0
    for rec in record["sequence_ops"]:
        if rec["kind"] == "N":
            noop += 1
            continue
        op = Op(VARIANT_MAP[rec["variant"]], rec["y"], rec["x"])
        if env.apply(op).ok:  # a failed apply changes nothing
            kept.append(op.to_record())
        else:
            not_applied += 1
    out = {**record, "zone_grid": zones.ravel().tolist(), "init_pattern": START, "initial_crossings": start,
           "sequence_ops": kept, "sequence_len": len(kept), "noop_ops": noop, "skipped_ops": not_applied,
           "source_line": line}
    mismatch = start != record["initial_crossings"]
    if mismatch:
        out["recorded_initial_crossings"] = record["initial_crossings"]
    return out, ImportCounts(len(kept), noop, not_applied, mismatch)


def load_trajectories(path: str | os.PathLike) -> tuple[list[dict], dict[str, int]]:
    """Every usable record of ``path``, cleaned (:func:`clean_record`), and the totals of what was
    skipped: ``{"lines", "records", "skipped_no_zone_grid", "noop_ops", "skipped_ops", "applied_ops",
    "initial_mismatch"}``. Reads the whole file (meant for held-out test files)."""
    scan = scan_file(path)
    wanted = {e[0] for e in scan.entries}
    records, totals = [], {"noop_ops": 0, "skipped_ops": 0, "applied_ops": 0, "initial_mismatch": 0}
    for line, record in read_records(path):
        if line in wanted:
            clean, counts = clean_record(record, line)
            records.append(clean)
            totals["noop_ops"] += counts.noop
            totals["skipped_ops"] += counts.not_applied
            totals["applied_ops"] += counts.applied
            totals["initial_mismatch"] += counts.initial_mismatch
    return records, {"lines": scan.lines, "records": len(records), "skipped_no_zone_grid": scan.skipped_no_zone_grid,
                     **totals}


def format_counts(counts: dict[str, int]) -> str:
    """One line of :func:`load_trajectories`' totals."""
    return (f"{counts['records']} records used of {counts['lines']} lines, {counts['skipped_no_zone_grid']} skipped "
            f"without zone_grid; ops applied {counts['applied_ops']}, skipped {counts['noop_ops']} 'N' no-ops and "
            f"{counts['skipped_ops']} that did not apply; {counts['initial_mismatch']} records whose zigzag start "
            f"differs from their initial_crossings")
