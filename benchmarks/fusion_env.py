"""FusionNet world: vectorised environment against the seed-style pure-Python one, and the teacher.

One *step* is what the annealing teacher does per accepted move: enumerate every applicable
operation with its crossing delta, then apply one of them (drawn uniformly). The pure-Python
reference (tests/examples/fusion_reference.py) checks every window of every variant against
its pattern and, per match, applies it, runs a depth-first search over the whole grid and
recounts the crossings, like the seed's ``refresh_move_pool``.

    python benchmarks/fusion_env.py            # 16x16 and 32x32, ~1 minute
    python benchmarks/fusion_env.py --quick    # 16x16 only, fewer repeats
    python benchmarks/fusion_env.py --only-data [--data DIR]   # the data-loading section alone

Data loading (``data_loading_table``): samples/s through GroupedStore -> PaddedDataset ->
BucketBatchSampler -> DataLoader (in-process, one torch thread, as one DDP rank on a 2-core box
runs) next to what one training step consumes: ``encode`` + FusionNet (CPU defaults) forward +
WTA/action losses + backward under bf16 autocast, on the same batches.
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


def _train_step_fn():
    from fusion.encoding import encode, legal_anchor_mask
    from fusion.model import FusionNet

    from blockyard.losses import neighborhood_cross_entropy, wta_heatmap_loss
    from blockyard.train import autocast

    model = FusionNet()

    def step(batch: dict) -> None:
        state, pad = batch["state"], batch["pad_mask"]
        x = encode(state, batch["initial_crossings"], pad)
        with autocast("cpu", "bf16"):
            out = model(x, batch["history"], batch["history_len"], batch["initial_crossings"])
        centers = batch["target"][:, :2]
        loss = wta_heatmap_loss(out.position, centers, legal_anchor_mask(state, pad)).loss
        loss = 5.0 * loss + neighborhood_cross_entropy(out.action, centers, batch["target"][:, 2])
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def data_loading_table(data: Path | None, batch_size: int, max_batches: int, train_batches: int) -> None:
    """Loader samples/s (natural-size buckets and padded to 32x32) vs training-step samples/s."""
    import tempfile

    import torch
    from fusion.build_data import ensure_dataset
    from torch.utils.data import DataLoader

    from blockyard.data import BucketBatchSampler, GroupedStore, PaddedDataset

    torch.set_num_threads(1)  # tiny ops on a loaded box: intra-op threads only add overhead
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_dataset(data or Path(tmp) / "data", smoke=data is None, verbose=False)
        store = GroupedStore(root / "train", verify=False)
        print(f"\ndata loading: {root / 'train'} ({len(store)} samples, groups "
              f"{', '.join('x'.join(map(str, g.key)) for g in store.groups)}), batch {batch_size}, 1 thread")
        print(f"{'pipeline':>38} {'samples/s':>10} {'vs train step':>14}")
        rates = {}
        for label, size in (("natural size (bucketed)", None), ("padded to 32x32", 32)):
            dataset = PaddedDataset(store, size=size)
            sampler = BucketBatchSampler(dataset, batch_size, shuffle=True, seed=0)
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
            n, start = 0, time.perf_counter()
            for i, batch in enumerate(loader):
                n += len(batch["target"])
                if i + 1 >= max_batches:
                    break
            rates[label] = n / (time.perf_counter() - start)
        step = _train_step_fn()
        dataset = PaddedDataset(store)
        loader = DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, batch_size, seed=1), num_workers=0)
        batches = [b for _, b in zip(range(train_batches + 1), loader)]
        step(batches[0])  # warm-up (allocator, autocast caches)
        n, start = 0, time.perf_counter()
        for batch in batches[1:]:
            step(batch)
            n += len(batch["target"])
        train_rate = n / (time.perf_counter() - start)
        for label, rate in rates.items():
            print(f"{label:>38} {rate:>10.0f} {rate / train_rate:>13.0f}x")
        print(f"{'train step (bf16 fwd+bwd, FusionNet)':>38} {train_rate:>10.1f} {1:>13.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-data", action="store_true", help="run only the data-loading section")
    parser.add_argument("--data", type=Path, default=None, help="dataset dir (default: a temporary smoke build)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    data_args = (args.data, args.batch_size, 40 if args.quick else 200, 3 if args.quick else 8)
    if args.only_data:
        data_loading_table(*data_args)
        return
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
    data_loading_table(*data_args)


if __name__ == "__main__":
    main()
