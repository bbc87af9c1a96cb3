"""Simulated-annealing teacher: records trajectories of operations that lower the crossing count.

The initial paths are local minima for single operations (on a zigzag, the only applicable ops
are transposes at the row turns, none of which changes the crossings), so a greedy teacher
yields nothing. Annealing walks through neutral and uphill moves instead:

    T(i) = T_min + (T_max - T_min) * sigmoid((10 / iters) * (iters / 2 - i))

accept an op with crossing change ``d`` if ``d <= 0``, else with probability ``exp(-d / T)``.
Proposals are drawn uniformly from *all* currently applicable ops (``FusionEnv.candidates``).
The pool is exact: it is rebuilt only after an accepted op, since a rejected proposal leaves
the state, hence the pool, unchanged (``refresh_every=k`` instead rebuilds it every k
iterations and re-checks each stale proposal, as the seed did). The record keeps the accepted
ops up to the first visit of the best state, uphill and neutral ones included; ``replay``
rebuilds the world from the record and re-applies them exactly.

Run as a script to write JSONL: ``python examples/fusion/teacher.py --out runs.jsonl``.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make `fusion` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion.env import Candidates, FusionEnv
from fusion.grid import init_path
from fusion.ops import Op

__all__ = ["SCHEDULE", "Replay", "ReplayStep", "env_from_record", "replay", "replay_steps", "run_teacher",
           "temperature"]

#: The teacher's annealing defaults (``iters``, ``t_max``, ``t_min``); the annealing baselines use them
#: for records that carry no schedule of their own (trajectory files in the seed's format).
SCHEDULE = {"iters": 3000, "t_max": 3.0, "t_min": 0.05}


def temperature(i: int, iters: int, t_max: float, t_min: float) -> float:
    """Sigmoid cooling from ``~t_max`` at ``i = 0`` to ``~t_min`` at ``i = iters``."""
    return t_min + (t_max - t_min) / (1.0 + math.exp(-(10.0 / iters) * (iters / 2 - i)))


def run_teacher(width: int, height: int, zone_pattern: str, seed: int, *, iters: int = SCHEDULE["iters"],
                t_max: float = SCHEDULE["t_max"], t_min: float = SCHEDULE["t_min"], init_pattern: str = "zigzag",
                stripe_direction: str = "v", num_zones: int = 3,
                num_islands: int = 3, island_size: int | None = None, refresh_every: int | None = None,
                run_id: str | None = None) -> dict:
    """One annealing run; returns its JSON-able record.

    Args:
        width, height: grid size (>= 3).
        zone_pattern: ``left_right``, ``stripes``, ``voronoi`` or ``islands`` (``grid.make_zones``).
        seed: seeds both the zones and the annealing (``numpy.random.SeedSequence(seed).spawn(2)``);
            the record is a deterministic function of the arguments (except ``runtime_sec``).
        iters: annealing iterations (proposals).
        t_max, t_min: the sigmoid schedule's ends; crossing deltas are about +-1..2.
        init_pattern: ``zigzag`` (default), ``vertical_zigzag``, ``stripes`` or ``auto``. ``auto``
            starts ``left_right`` and vertical ``stripes`` on a vertical zigzag, which already has
            the minimum ``K - 1`` crossings: nothing to improve, hence no samples. The seed's
            released data used ``zigzag`` everywhere. The resolved name is recorded.
        refresh_every: ``None`` = exact pool (rebuilt after each accepted op); ``k`` = rebuilt every
            ``k`` iterations, stale proposals re-checked and rejected if no longer applicable.
        run_id: defaults to ``sa_W{w}H{h}_{pattern}_seed{seed}``.

    Returns:
        ``run_id, seed, grid_W, grid_H, zone_pattern, stripe_direction, num_zones, init_pattern,
        zone_grid`` (flat row-major, ``0..K-1``), ``initial_crossings, final_crossings`` (the best),
        ``sequence_len, sequence_ops`` (``{kind, x, y, variant}`` each), ``n_accepted, iters, t_max,
        t_min, runtime_sec``.
    """
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    if refresh_every is not None and refresh_every < 1:
        raise ValueError(f"refresh_every: expected None or >= 1, got {refresh_every}")
    start = time.perf_counter()
    zone_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    env = FusionEnv.create(width, height, zone_pattern, init_pattern=init_pattern, rng=zone_rng,
                           stripe_direction=stripe_direction, num_zones=num_zones, num_islands=num_islands,
                           island_size=island_size)
    initial = best = env.crossings
    accepted: list[Op] = []
    best_len = 0
    pool, stale = env.candidates(), False
    for i in range(iters):
        if refresh_every is not None and i % refresh_every == 0 and i > 0:
            pool, stale = env.candidates(), False
        if pool.size == 0:
            continue
        j = int(rng.integers(pool.size))
        op, delta = pool.op(j), int(pool.delta[j])
        if stale:
            result = env.evaluate(op)
            if not result.ok:
                continue
            delta = result.delta
        if delta > 0 and rng.random() >= math.exp(-delta / temperature(i, iters, t_max, t_min)):
            continue
        env.apply(op)
        accepted.append(op)
        if env.crossings < best:
            best, best_len = env.crossings, len(accepted)
        if refresh_every is None:
            pool = env.candidates()
        else:
            stale = True
    ops = accepted[:best_len]
    return {
        "run_id": run_id or f"sa_W{width}H{height}_{zone_pattern}_seed{seed}",
        "seed": int(seed),
        "grid_W": int(width),
        "grid_H": int(height),
        "zone_pattern": zone_pattern,
        "stripe_direction": stripe_direction,
        "num_zones": int(env.zones.max()) + 1,
        "init_pattern": env.init_pattern,
        "zone_grid": env.zones.ravel().tolist(),
        "initial_crossings": int(initial),
        "final_crossings": int(best),
        "sequence_len": len(ops),
        "sequence_ops": [op.to_record() for op in ops],
        "n_accepted": len(accepted),
        "iters": int(iters),
        "t_max": float(t_max),
        "t_min": float(t_min),
        "runtime_sec": round(time.perf_counter() - start, 4),
    }


def env_from_record(record: dict) -> FusionEnv:
    """The initial world of a record: its zones and its recorded (resolved) init pattern."""
    w, h = int(record["grid_W"]), int(record["grid_H"])
    zones = np.asarray(record["zone_grid"], dtype=np.int64)
    if zones.size != w * h:
        raise ValueError(f"zone_grid: expected {w * h} = grid_W * grid_H values, got {zones.size}")
    H, V = init_path(w, h, record["init_pattern"])
    return FusionEnv(zones.reshape(h, w), H, V, zone_pattern=record["zone_pattern"],
                     init_pattern=record["init_pattern"], check=False)


class ReplayStep(NamedTuple):
    index: int  # position in sequence_ops
    op: Op
    H: np.ndarray  # (h, w-1) bool edges *before* the op (a copy)
    V: np.ndarray  # (h-1, w) bool edges before the op (a copy)
    crossings_before: int
    crossings_after: int
    candidates: Candidates | None = None  # every applicable op before the op (``replay_steps(candidates=True)``)


class Replay(NamedTuple):
    env: FusionEnv  # the final state
    crossings: list[int]  # before the first op, then after each op (len = n_ops + 1)
    ops: list[Op]


def replay_steps(record: dict, *, candidates: bool = False) -> Iterator[ReplayStep]:
    """Re-apply a record's ops one by one, yielding the state before each op and the crossings
    around it (with ``candidates``, also every op applicable there, with its delta). Raises
    ``ValueError`` naming the step if an op does not apply."""
    env = env_from_record(record)
    for index, rec in enumerate(record["sequence_ops"]):
        op = Op.from_record(rec)
        H, V, before = env.H.copy(), env.V.copy(), env.crossings
        pool = env.candidates() if candidates else None
        result = env.apply(op)
        if not result.ok:
            raise ValueError(f"sequence_ops[{index}]: {rec} does not apply ({result.status.value}) "
                             f"in run {record.get('run_id')!r}")
        yield ReplayStep(index, op, H, V, before, env.crossings, pool)


def replay(record: dict) -> Replay:
    """Rebuild the world from ``record`` and apply all its ops exactly."""
    env = env_from_record(record)
    crossings, ops = [env.crossings], []
    for index, rec in enumerate(record["sequence_ops"]):
        op = Op.from_record(rec)
        result = env.apply(op)
        if not result.ok:
            raise ValueError(f"sequence_ops[{index}]: {rec} does not apply ({result.status.value}) "
                             f"in run {record.get('run_id')!r}")
        crossings.append(env.crossings)
        ops.append(op)
    return Replay(env, crossings, ops)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--pattern", default="voronoi")
    parser.add_argument("--init", default="zigzag")
    parser.add_argument("--seeds", type=int, default=4, help="runs with seeds 0..N-1")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("runs/fusion/trajectories.jsonl"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for seed in range(args.seeds):
            rec = run_teacher(args.width, args.height, args.pattern, seed, iters=args.iters, init_pattern=args.init)
            f.write(json.dumps(rec) + "\n")
            print(f"{rec['run_id']}: {rec['initial_crossings']} -> {rec['final_crossings']} "
                  f"({rec['sequence_len']} ops, {rec['runtime_sec']:.2f} s)")


if __name__ == "__main__":
    main()
