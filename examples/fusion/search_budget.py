"""What more proposals buy: setting 2's annealing at growing budgets, against the region bound.

System: FusionNet v2. Setting 2 of the inference table anneals from the initial paths with the
teacher's 3000 proposals and reports the share of the gap to the region bound each search closes
(``bound.gap_closed``). This script runs the same searches on the same test trajectories (the
selection of ``infer.run_evaluation`` for each ``--seeds`` value), with the same random streams,
at each of ``--budgets`` proposals (the teacher's schedule stretched over the budget):

- ``uniform``: uniform proposals (the teacher), at 3000 proposals exactly setting 2's ``uniform``;
- ``oracle``: setting 2's oracle guide (half the proposals drawn among the pool's improving ops
  in the cold half; it reads every pool op's change, so it is a reference, not a search), at 3000
  exactly setting 2's ``oracle``;
- ``oracle-ils`` (``--guides``): not annealing, iterated local search whose descent always takes
  an improving op when one exists (``oracle_ils``), kicked by 8 random ops at each local minimum.

So it says how far from the bound annealing itself stays at the budget a guide is measured at,
what budget a search needs to close a given share, and whether a perfect improving-op proposer
inside another search family gets further. No model is involved.

    python examples/fusion/search_budget.py --data runs/fusion/data
    python examples/fusion/search_budget.py --data runs/fusion/data --guides oracle-ils
    python examples/fusion/search_budget.py --data runs/fusion/data --budgets 3000,30000 --seeds 0 --workers 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.train.sweeps import sweep_summary
from fusion.bound import gap_closed
from fusion.env import FusionEnv
from fusion.infer import AnnealGuide, _rng, anneal_record, load_split_records, record_bound, setting2_records
from fusion.search import drive
from fusion.teacher import env_from_record

#: search -> its random-stream key: for the annealers setting 2's (``infer._anneal_setting``), so 3000
#: proposals replay setting 2
GUIDES = {"uniform": 4, "oracle": 8, "oracle-ils": 11}


def oracle_ils(env: FusionEnv, budget: int, rng: np.random.Generator, kick: int = 8) -> int:
    """Iterated local search with an oracle descent; returns the best crossing count seen.

    Descent: while the pool has an improving op, apply one drawn uniformly among them (one proposal
    each: the oracle reads every op's change, the best any improving-op proposer could do). At a
    local minimum (one more proposal, the check that finds none) the walk keeps it if it is no
    worse than the last kept one, else returns there, then applies ``kick`` uniform pool ops (one
    proposal each) and descends again, until ``budget`` proposals are spent.
    """
    best = home_crossings = env.crossings
    home, used = env.copy(), 0
    while used < budget:
        pool = env.candidates()
        if pool.size == 0:
            break
        improving = np.flatnonzero(pool.delta < 0)
        used += 1
        if improving.size:
            if not env.apply(pool.op(int(improving[rng.integers(improving.size)]))).ok:
                raise RuntimeError("pool op does not apply")
            best = min(best, env.crossings)
            continue
        if env.crossings <= home_crossings:
            home, home_crossings = env.copy(), env.crossings
        else:
            env = home.copy()
        for _ in range(min(kick, budget - used)):
            pool = env.candidates()
            if not env.apply(pool.op(int(rng.integers(pool.size)))).ok:
                raise RuntimeError("pool op does not apply")
            used += 1
    return best


def anneal_final(task: tuple[dict, str, int, int, int]) -> int:
    """The best crossing count of one search: (record, guide, budget, seed, index in the selection)."""
    rec, guide, budget, seed, i = task
    if guide == "oracle-ils":
        return oracle_ils(env_from_record(rec), budget, _rng(seed, GUIDES[guide], i))
    run = anneal_record(rec, guide, budget, _rng(seed, GUIDES[guide], i), AnnealGuide())
    return drive([run])[0].best


def measure(records: list[dict], budgets: list[int], seeds: list[int], per_pattern: int, workers: int,
            guides: tuple[str, ...] = ("uniform", "oracle")) -> dict:
    """``{guide: {budget: {seed: {pattern | "overall": gap closed}}}}`` and the runs' seconds."""
    tasks, keys = [], []
    for seed in seeds:
        chosen = setting2_records(records, per_pattern, seed)
        for guide in guides:
            for budget in budgets:
                for i, rec in enumerate(chosen):
                    tasks.append((rec, guide, budget, seed, i))
                    keys.append((guide, budget, seed))
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        finals = list(pool.map(anneal_final, tasks, chunksize=1))
    out: dict = {g: {b: {s: {} for s in seeds} for b in budgets} for g in guides}
    grouped: dict = {}
    for (guide, budget, seed), task, final in zip(keys, tasks, finals, strict=True):
        rec = task[0]
        for name in (rec["zone_pattern"], "overall"):
            rows = grouped.setdefault((guide, budget, seed, name), ([], [], []))
            rows[0].append(rec["initial_crossings"])
            rows[1].append(final)
            rows[2].append(record_bound(rec))
    for (guide, budget, seed, name), (initial, final, bound) in grouped.items():
        out[guide][budget][seed][name] = gap_closed(initial, final, bound)
    return {"gap_closed": out, "seconds": round(time.perf_counter() - started, 1)}


def format_table(result: dict, budgets: list[int], seeds: list[int]) -> str:
    patterns = sorted({p for g in result["gap_closed"].values() for b in g.values() for s in b.values() for p in s})
    patterns = [p for p in patterns if p != "overall"] + ["overall"]
    lines = ["| guide | proposals | " + " | ".join(patterns) + " |", "|---|---|" + "---|" * len(patterns)]
    for guide, by_budget in result["gap_closed"].items():
        for budget in budgets:
            cells = []
            for p in patterns:
                s = sweep_summary([by_budget[budget][seed].get(p) for seed in seeds])
                cells.append(f"{s.median:.0%}" + (f" [{s.q25:.0%}, {s.q75:.0%}]" if len(seeds) > 1 else ""))
            lines.append(f"| {guide} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a FusionNet dataset folder (its test split is used)")
    p.add_argument("--budgets", default="3000,10000,30000,100000", help="comma-separated proposal budgets")
    p.add_argument("--seeds", default="0,1,2", help="setting 2's selection seeds (fusion_ddp --seed)")
    p.add_argument("--per-pattern", type=int, default=8, help="test trajectories per zone pattern (setting 2: 8)")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--guides", default="uniform,oracle", help=f"comma-separated, of {list(GUIDES)}")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    try:
        args.budgets = [int(b) for b in args.budgets.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--budgets, --seeds: expected comma-separated integers, got {args.budgets!r}, {args.seeds!r}")
    args.guides = tuple(args.guides.split(","))
    if not set(args.guides) <= set(GUIDES):
        p.error(f"--guides: expected names from {list(GUIDES)}, got {args.guides}")
    if min(args.budgets) < 1 or args.per_pattern < 1 or args.workers < 1:
        p.error("--budgets, --per-pattern, --workers: expected integers >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = measure(load_split_records(args.data), args.budgets, args.seeds, args.per_pattern, args.workers,
                     args.guides)
    print(f"setting 2's searches at more proposals: share of the gap to the region bound closed, median [IQR] over "
          f"selection seeds {args.seeds} ({args.per_pattern} trajectories per pattern; {result['seconds']} s)")
    print(format_table(result, args.budgets, args.seeds))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
