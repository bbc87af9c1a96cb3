"""Choose setting 2's model guide on validation trajectories: each setting against uniform annealing.

System: FusionNet v2. Setting 2 of the inference table anneals from the initial paths with a mix
of uniform and model-weighted proposals (``infer.AnnealGuide``: the share of uniform proposals,
the temperature on the model's distribution, how often it re-scores, the uniform hot start) and
compares it with uniform annealing (the teacher) at the same proposals. This script runs that
comparison for every guide of a grid, for every checkpoint given (one per training seed), on the
trajectories of one split of the dataset, ``val`` by default, so a guide is chosen without looking
at the test grids the inference table reports.

Each checkpoint's searches use setting 2's random streams with the checkpoint's training seed (read
from its run folder's ``run.json``, else its position): on the test split with ``--per-pattern 8``
a checkpoint's uniform and default-guide gap closed are exactly its setting 2 numbers. Every guide
meets the same uniform runs (common random numbers). ``--repeats R`` adds R - 1 more random streams
per checkpoint.

Printed per guide: per zone pattern the median over checkpoints (and repeats) of the share of the gap
to the region bound closed by the model-guided search minus uniform's (``bound.gap_closed``, in
points), the patterns where that median is above 0, the overall gap closed and the model's CPU time
over uniform's. The chosen guide wins the most patterns, then closes the most of the gap overall.

    python examples/fusion/guide_sweep.py --data runs/fusion_study/data \\
        --checkpoints runs/fusion_study/default/seed0/checkpoints,runs/fusion_study/default/seed1/checkpoints
    python examples/fusion/guide_sweep.py --data DATA --checkpoints CKPT --temperatures 1,4 --explore 0.5,0.75
    python examples/fusion/guide_sweep.py --data DATA --combine a.json,b.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.train import RUN_FILE
from blockyard.train.sweeps import sweep_summary
from fusion.bound import gap_closed
from fusion.infer import (
    AnnealGuide,
    _rng,
    anneal_record,
    load_checkpoint,
    load_split_records,
    model_scorer,
    record_bound,
    record_schedule,
    saved_model_config,
    setting2_records,
)
from fusion.search import drive

__all__ = ["choose", "combine", "format_table", "sweep"]


def _stream(seed: int, key: int, i: int, repeat: int) -> np.random.Generator:
    # repeat 0 is setting 2's stream (infer._anneal_setting: key 3 model, 4 uniform)
    return _rng(seed, key, i) if repeat == 0 else _rng(seed, key, i, repeat)


def _gaps(chosen: list[dict], finals: list[int]) -> dict[str, float | None]:
    rows: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for rec, final in zip(chosen, finals, strict=True):
        for name in (rec["zone_pattern"], "overall"):
            rows[name][0].append(rec["initial_crossings"])
            rows[name][1].append(final)
            rows[name][2].append(record_bound(rec))
    return {name: gap_closed(*cols) for name, cols in rows.items()}


def sweep(records: list[dict], scorers: list[tuple[int, object]], guides: dict[str, AnnealGuide], *,
          per_pattern: int, repeats: int = 1) -> dict:
    """Model-guided (each of ``guides``) and uniform annealing from the initial paths of ``records``.

    Args:
        records: teacher records (one split of a dataset).
        scorers: ``(seed, score)`` per checkpoint: its setting 2 stream seed and ``infer.model_scorer``.
        guides: name -> guide.
        per_pattern: trajectories per zone pattern (``infer.setting2_records`` with each seed).
        repeats: random streams per checkpoint (the first is setting 2's).

    Returns:
        ``{"uniform": [gaps], name: [gaps], "seconds": {...}}``: one ``{pattern | "overall": gap closed}``
        per (checkpoint, repeat), in order; ``seconds`` holds each search kind's CPU seconds in total.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    out: dict = {"uniform": [], **{name: [] for name in guides}}
    seconds: dict[str, float] = defaultdict(float)
    for seed, score in scorers:
        chosen = setting2_records(records, per_pattern, seed)
        budgets = [record_schedule(rec)["iters"] for rec in chosen]
        for repeat in range(repeats):
            for name, kind, key, guide in [("uniform", "uniform", 4, AnnealGuide()),
                                           *((n, "model", 3, g) for n, g in guides.items())]:
                clock = [0.0] * len(chosen)
                runs = drive([anneal_record(rec, kind, b, _stream(seed, key, i, repeat), guide)
                              for i, (rec, b) in enumerate(zip(chosen, budgets, strict=True))],
                             score if kind == "model" else None, clock=clock)
                out[name].append(_gaps(chosen, [r.best for r in runs]))
                seconds[name] += sum(clock)
    out["seconds"] = dict(seconds)
    return out


def _deltas(result: dict, name: str, pattern: str) -> list[float]:
    return [g[pattern] - u[pattern] for g, u in zip(result[name], result["uniform"], strict=True)]


def choose(result: dict, guides: dict[str, AnnealGuide]) -> str:
    """The guide whose median gain over uniform is above 0 on the most patterns, then the best overall."""
    patterns = sorted(p for p in result["uniform"][0] if p != "overall")

    def key(name: str):
        wins = sum(np.median(_deltas(result, name, p)) > 0 for p in patterns)
        return wins, float(np.median([g["overall"] for g in result[name]]))

    return max(guides, key=key)


def format_table(result: dict, guides: dict[str, AnnealGuide]) -> str:
    patterns = sorted(p for p in result["uniform"][0] if p != "overall")
    lines = ["| guide | " + " | ".join(f"{p} (points)" for p in patterns)
             + " | patterns won | overall gap closed | CPU time / uniform |",
             "|---|" + "---|" * (len(patterns) + 3)]
    uniform = sweep_summary([g["overall"] for g in result["uniform"]]).median
    lines.append("| uniform | " + " | ".join("0" for _ in patterns) + f" | - | {uniform:.1%} | 1.00 |")
    for name in guides:
        cells, won = [], 0
        for p in patterns:
            s = sweep_summary([100 * d for d in _deltas(result, name, p)])
            won += s.median > 0
            cells.append(f"{s.median:+.1f}" + (f" [{s.q25:+.1f}, {s.q75:+.1f}]" if s.n > 1 else ""))
        overall = sweep_summary([g["overall"] for g in result[name]]).median
        ratio = result["seconds"][name] / max(result["seconds"]["uniform"], 1e-9)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {won}/{len(patterns)} | {overall:.1%} | {ratio:.2f} |")
    return "\n".join(lines)


def _floats(text: str, flag: str, parser: argparse.ArgumentParser) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated numbers, got {text!r}")
        raise  # unreachable: parser.error exits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a FusionNet dataset folder")
    p.add_argument("--checkpoints", default="",
                   help="comma-separated checkpoints folders (or step_* checkpoints), one per training seed")
    p.add_argument("--split", default="val", help="the dataset split whose trajectories are annealed (default val)")
    p.add_argument("--per-pattern", type=int, default=1_000_000, help="trajectories per zone pattern (default all)")
    p.add_argument("--repeats", type=int, default=1, help="random streams per checkpoint")
    defaults = AnnealGuide()
    p.add_argument("--temperatures", default="1,2,4,8", help="model temperatures of the grid")
    p.add_argument("--explore", default=f"{defaults.explore_prob}", help="shares of uniform proposals of the grid")
    p.add_argument("--model-start", default=f"{defaults.model_start}", help="uniform hot-start shares of the grid")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--combine", default=None, metavar="A.json,B.json",
                   help="print the table of earlier --json results together (e.g. one per checkpoint, run apart; "
                        "the same grid) instead of running")
    args = p.parse_args(argv)
    args.checkpoints = [Path(c) for c in args.checkpoints.split(",") if c.strip()]
    grid = itertools.product(_floats(args.explore, "--explore", p), _floats(args.temperatures, "--temperatures", p),
                             _floats(args.model_start, "--model-start", p))
    args.guides = {f"explore {e:g}, T {t:g}, start {s:g}": defaults._replace(explore_prob=e, model_temperature=t,
                                                                             model_start=s)
                   for e, t, s in grid}
    if (not args.checkpoints and not args.combine) or not args.guides or args.per_pattern < 1:
        p.error("--checkpoints, the guide grid: expected at least one each; --per-pattern: expected >= 1")
    return args


def checkpoint_seed(checkpoint: Path, fallback: int) -> int:
    """The training seed in the run folder's ``run.json`` above ``checkpoint`` (else ``fallback``)."""
    for folder in (checkpoint, *checkpoint.parents[:3]):
        if (folder / RUN_FILE).is_file():
            return int(json.loads((folder / RUN_FILE).read_text()).get("config", {}).get("seed", fallback))
    return fallback


def combine(results: list[dict]) -> dict:
    """Several :func:`sweep` results of the same guides as one: their checkpoints' rows and seconds together."""
    names = [set(r) - {"seconds", "chosen", "guides"} for r in results]
    if any(n != names[0] for n in names):
        raise ValueError(f"results: expected the same guides in every result, got {[sorted(n) for n in names]}")
    out: dict = {name: [row for r in results for row in r[name]] for name in names[0]}
    out["seconds"] = {name: sum(r["seconds"][name] for r in results) for name in names[0]}
    return out


def main(argv=None) -> None:
    import torch

    from fusion.model import FusionNet

    args = parse_args(argv)
    if args.combine:
        saved = [json.loads(Path(f).read_text()) for f in args.combine.split(",")]
        result = combine(saved)
        guides = {n: AnnealGuide(**g) for n, g in saved[0]["guides"].items()}
        print(f"{len(saved)} sweep results, {len(result['uniform'])} (checkpoint, stream) pairs")
        print(format_table(result, guides))
        print(f"chosen: {choose(result, guides)}")
        return
    torch.manual_seed(0)
    scorers = []
    for k, ckpt in enumerate(args.checkpoints):
        net = FusionNet(**(saved_model_config(ckpt) or {}))
        load_checkpoint(ckpt, net)
        scorers.append((checkpoint_seed(ckpt, k), model_scorer(net.eval())))
    records = load_split_records(args.data, args.split)
    started = time.perf_counter()
    result = sweep(records, scorers, args.guides, per_pattern=args.per_pattern, repeats=args.repeats)
    best = choose(result, args.guides)
    print(f"setting 2 on the {args.split} split ({len(records)} trajectories), model-guided minus uniform gap closed, "
          f"median [IQR] over {len(scorers)} checkpoint(s) x {args.repeats} stream(s) "
          f"(seeds {[s for s, _ in scorers]}; {time.perf_counter() - started:.0f} s)")
    print(format_table(result, args.guides))
    print(f"chosen: {best} ({args.guides[best]})")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "chosen": best,
                                               "guides": {n: g._asdict() for n, g in args.guides.items()}}, indent=1))


if __name__ == "__main__":
    main()
