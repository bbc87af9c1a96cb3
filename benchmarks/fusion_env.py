"""FusionNet world: vectorised environment against the seed-style pure-Python one, and the teacher.

One *step* is what the annealing teacher does per accepted move: enumerate every applicable
operation with its crossing delta, then apply one of them (drawn uniformly). The pure-Python
reference (tests/examples/fusion_reference.py) checks every window of every variant against
its pattern and, per match, applies it, runs a depth-first search over the whole grid and
recounts the crossings, like the seed's ``refresh_move_pool``.

    python benchmarks/fusion_env.py            # 16x16 and 32x32, ~1 minute
    python benchmarks/fusion_env.py --quick    # 16x16 only, fewer repeats
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "tests" / "examples")]

from fusion.env import FusionEnv  # noqa: E402
from fusion.teacher import replay, run_teacher  # noqa: E402
from fusion_reference import ReferenceGrid  # noqa: E402


def mid_run_state(size: int, seed: int = 0, warmup: int = 400) -> tuple[FusionEnv, np.random.Generator]:
    rng = np.random.default_rng(seed)
    env = FusionEnv.create(size, size, "voronoi", init_pattern="zigzag", rng=rng)
    for _ in range(warmup):
        c = env.candidates()
        env.apply(c.op(int(rng.integers(c.size))))
    return env, rng


def vectorised_steps_per_s(size: int, steps: int) -> tuple[float, float]:
    env, rng = mid_run_state(size)
    start = time.perf_counter()
    total = 0
    for _ in range(steps):
        c = env.candidates()
        total += c.size
        env.apply(c.op(int(rng.integers(c.size))))
    return steps / (time.perf_counter() - start), total / steps


def rebuild_steps_per_s(size: int, steps: int) -> float:
    # the same step without the incrementally kept maps: every window recoded from scratch
    env, rng = mid_run_state(size)
    start = time.perf_counter()
    for _ in range(steps):
        c = FusionEnv(env.zones, env.H, env.V, check=False).candidates()
        env.apply(c.op(int(rng.integers(c.size))))
    return steps / (time.perf_counter() - start)


def reference_steps_per_s(size: int, steps: int) -> float:
    env, rng = mid_run_state(size)
    ref = ReferenceGrid(env.zones, env.H, env.V)
    start = time.perf_counter()
    for _ in range(steps):
        ops = list(ref.enumerate_ops())
        ref.try_op(*ops[int(rng.integers(len(ops)))], keep=True)
    return steps / (time.perf_counter() - start)


def teacher_runs(size: int, seeds: range, **kwargs) -> dict:
    times, reductions, effective = [], [], []
    for seed in seeds:
        start = time.perf_counter()
        rec = run_teacher(size, size, "voronoi", seed, **kwargs)
        times.append(time.perf_counter() - start)
        reductions.append(rec["initial_crossings"] - rec["final_crossings"])
        c = replay(rec).crossings
        effective.append(sum(b < a for a, b in itertools.pairwise(c)))
    return {"time": statistics.mean(times), "reduction": statistics.mean(reductions),
            "effective": statistics.mean(effective)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = (16,) if args.quick else (16, 32)
    print("steps/s = enumerate all applicable ops with deltas + apply one (voronoi, mid-run state)")
    print(f"{'grid':>6} {'ops/step':>9} {'vectorised':>11} {'no-incr.':>9} {'pure Python':>12} {'speed-up':>9}")
    for size in sizes:
        fast, pool = vectorised_steps_per_s(size, 2000 if args.quick else 5000)
        rebuild = rebuild_steps_per_s(size, 300 if args.quick else 1000)
        slow = reference_steps_per_s(size, 3 if args.quick else 5)
        print(f"{size:>3}x{size:<2} {pool:>9.0f} {fast:>11.0f} {rebuild:>9.0f} {slow:>12.2f} {fast / slow:>8.0f}x")
    print("\nteacher, one trajectory at 32x32 voronoi, 3000 iterations (mean over seeds)")
    print(f"{'pool refresh':>22} {'seconds':>8} {'reduction':>10} {'effective ops':>14}")
    seeds = range(2) if args.quick else range(4)
    for label, kwargs in (("after each accept", {}), ("every 25 iters (seed)", {"refresh_every": 25})):
        r = teacher_runs(32, seeds, iters=3000, **kwargs)
        print(f"{label:>22} {r['time']:>8.2f} {r['reduction']:>10.1f} {r['effective']:>14.1f}")


if __name__ == "__main__":
    main()
