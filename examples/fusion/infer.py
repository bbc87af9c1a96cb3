"""FusionNet inference, measured on held-out test trajectories against model-free baselines.

Three settings, per zone pattern (the seed's greedy inference reported zero reductions because it
started from the initial paths, where hardly any single op lowers the crossings):

1. **Mid-trajectory states** (the state before each effective op of a test trajectory, with its
   true history; an improving op exists). Greedy model-guided search (``search.greedy_search``
   with the seed's per-hypothesis candidates, adaptive give-up, history seeding and stochastic
   exploration) against the same greedy loop checking ops in uniformly random order, with the
   same try budget (each op check is one try; the random search gets exactly the tries the model
   search used). Reported: mean crossing reduction, fraction improved, tries to the first
   improvement; for reference the brute-force greedy (which reads every op's delta) and what the
   teacher's trajectory still gained from that state.
2. **Initial paths.** Annealing with the teacher's schedule and Metropolis acceptance from each
   test trajectory's initial path: model-guided (``search.anneal(guide="model")``, configured by
   :class:`AnnealGuide`: a mix of uniform and model-weighted proposals, the model's temperature,
   how often it re-scores the state, and a uniform hot start without model calls) against uniform
   proposals (the teacher itself) at the same proposal budget (the record's ``iters``; the
   teacher's default schedule for records without one), and against uniform proposals at the same
   time: the budget times the pattern's measured model/uniform time ratio (CPU seconds,
   ``search.drive``). Reported: mean best reduction, the share of the gap to the region bound
   closed (``bound.py``; for the teacher's own record too), per-grid wins and losses, fraction
   reaching the teacher record's result, model calls per grid; and, for reference, the same
   annealer with the model's proposals replaced by the pool's improving ops (an oracle that reads
   every delta: what a perfect improving-op proposer would reach).
3. **The seed's inference protocol from the initial paths** (its own table, the seed's columns).
   ``search.greedy_search`` exactly as the seed ran it: history seeding (Change 10), the K x 8
   per-hypothesis candidates with 3 actions each (8), exploration with probability 0.15 (11) and
   the adaptive give-up (9), from each test trajectory's initial path; against the same greedy
   loop checking ops in random order with the same number of op checks. Reported per zone
   pattern: mean reduction (absolute and % of the initial crossings), the teacher's own
   reduction (the record's initial -> final), the share reaching at least the teacher's final
   count, and the share improved. Few single ops improve an initial path (none on a zigzag over
   left_right or stripes zones), which is why the seed's greedy inference reported zero reductions.

The test trajectories are the test split of the dataset, or the records of a held-out file in
the seed's JSONL format (``--test-trajectories``, read with ``trajectories.load_trajectories``).

Every setting reports the share of the gap between its start and the (connected zone regions - 1)
lower bound that each search closed (``bound.gap_closed``). Every random choice comes from
``numpy.random.SeedSequence([seed, ...])``: same seed, same table (setting 2's equal-time budget
follows a measured time ratio unless ``time_ratio`` fixes it).

    python examples/fusion/infer.py --checkpoint runs/fusion/checkpoints --data runs/fusion/data
    python examples/fusion/infer.py --checkpoint runs/fusion/checkpoints --test-trajectories test.jsonl
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `fusion` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockyard.train import RUN_FILE, CheckpointManager
from fusion.bound import crossing_bound
from fusion.encoding import encode, legal_anchor_mask, state_channels
from fusion.env import FusionEnv
from fusion.inference_table import (
    anneal_row,
    format_table,
    greedy_row,
    rows_by_pattern,
    search_criteria,
    seed_protocol_row,
)
from fusion.search import History, ScoreRequest, Scores, SearchGen, anneal, drive, greedy_search
from fusion.teacher import SCHEDULE, env_from_record, replay_steps
from fusion.trajectories import format_counts, load_trajectories

__all__ = [
    "AnnealGuide",
    "Start",
    "anneal_record",
    "format_table",
    "load_checkpoint",
    "load_split_records",
    "mid_trajectory_starts",
    "model_scorer",
    "record_bound",
    "record_schedule",
    "run_evaluation",
    "saved_model_config",
    "search_criteria",
    "setting2_records",
]

log = logging.getLogger(__name__)


def _checkpoint_folder(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return path.parent if (path / "manifest.json").exists() else path


def saved_model_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """FusionNet's keywords as saved by the run that wrote ``checkpoint``, or None if it saved none.

    ``checkpoint`` is a run's checkpoint folder (``RUN/checkpoints``) or one ``step_*`` in it; the
    configuration is read from that run's ``RUN/run.json`` (written by ``fusion_ddp.py``).
    """
    run_file = _checkpoint_folder(checkpoint).parent / RUN_FILE
    config = json.loads(run_file.read_text()).get("config", {}) if run_file.exists() else {}
    if not {"widths", "hypotheses", "rnn_hidden"} <= set(config):
        return None
    widths = tuple(config["widths"])
    # runs from before --levels/--max-grid had len(widths) - 1 poolings and 128-row y/x tables
    return {"widths": widths, "levels": config.get("levels") or len(widths) - 1, "hypotheses": config["hypotheses"],
            "rnn_hidden": config["rnn_hidden"], "max_grid": config.get("max_grid", 128)}


def load_checkpoint(checkpoint: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load ``model``'s weights from one ``step_*`` checkpoint, or from a checkpoint folder's best.

    Only reads: the folder may belong to a run that is still writing it.

    Raises:
        FileNotFoundError: ``checkpoint`` holds no intact checkpoint.
    """
    path = Path(checkpoint)
    folder = _checkpoint_folder(path)
    manager = CheckpointManager(folder, rng=False, is_main=False)  # is_main=False: never clean up its folder
    loaded = manager.load(path, {"model": model}) if folder != path else manager.load_best({"model": model})
    if loaded is None:
        raise FileNotFoundError(f"checkpoint: no intact checkpoint with a metric in {path}")
    return loaded


def model_scorer(model: torch.nn.Module, *, device: str | torch.device = "cpu",
                 max_batch: int = 32) -> Callable[[list[ScoreRequest]], list[Scores]]:
    """A scoring function for ``search.drive``: requests are grouped by grid shape (no padding, as
    in training) and run through ``model`` in batches of at most ``max_batch``. Position
    probabilities are each hypothesis' softmax over the legal anchors (``encoding.legal_anchor_mask``)."""

    @torch.inference_mode()
    def score(requests: list[ScoreRequest]) -> list[Scores]:
        out: list[Scores | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.env.zones.shape].append(i)
        for idx in groups.values():
            for lo in range(0, len(idx), max_batch):
                chunk = [requests[i] for i in idx[lo:lo + max_batch]]
                state = torch.from_numpy(np.stack([state_channels(r.env.zones, r.env.H, r.env.V) for r in chunk]))
                state = state.to(device)
                initial = torch.tensor([r.initial_crossings for r in chunk], device=device)
                history = torch.from_numpy(np.stack([r.history.array() for r in chunk])).to(device)
                length = torch.tensor([len(r.history) for r in chunk], dtype=torch.long, device=device)
                masked = legal_anchor_mask(state)
                pred = model(encode(state, initial), history, length, initial)
                logits = pred.position.float().masked_fill(masked[:, None], -1e9)
                pos = logits.flatten(2).softmax(-1).view_as(logits) * (~masked)[:, None]
                act = pred.action.float().softmax(1)
                pos, act = pos.cpu().numpy(), act.cpu().numpy()
                for j, i in enumerate(idx[lo:lo + max_batch]):
                    out[i] = Scores(pos[j], act[j])
        return out  # type: ignore[return-value]

    return score


# -- data ---------------------------------------------------------------------------------------
def load_split_records(data_dir: str | Path, split: str = "test") -> list[dict]:
    """One split's teacher records (``DIR/splits.json`` run ids, ``DIR/trajectories.jsonl``): ``"test"`` for
    the inference table, ``"val"`` to choose a search's settings without looking at the test grids."""
    data_dir = Path(data_dir)
    splits = json.loads((data_dir / "splits.json").read_text())
    if split not in splits:
        raise ValueError(f"split: expected one of {sorted(splits)} (the splits of {data_dir / 'splits.json'}), "
                         f"got {split!r}")
    wanted = set(splits[split])
    if not wanted:
        raise ValueError(f"data_dir: {data_dir / 'splits.json'} has no {split} run ids")
    with (data_dir / "trajectories.jsonl").open() as f:
        records = [rec for rec in map(json.loads, filter(str.strip, f)) if rec["run_id"] in wanted]
    missing = wanted - {rec["run_id"] for rec in records}
    if missing:
        raise ValueError(f"data_dir: {len(missing)} {split} run ids not in trajectories.jsonl, "
                         f"e.g. {sorted(missing)[0]}")
    return records


class Start(NamedTuple):
    """A mid-trajectory state: the one before ``record``'s op ``index``, an effective op."""

    record: dict
    index: int
    H: np.ndarray
    V: np.ndarray
    crossings: int
    history: History  # the trajectory's previous effective ops

    def env(self) -> FusionEnv:
        rec = self.record
        zones = np.asarray(rec["zone_grid"], dtype=np.int64).reshape(rec["grid_H"], rec["grid_W"])
        return FusionEnv(zones, self.H, self.V, zone_pattern=rec["zone_pattern"], init_pattern=rec["init_pattern"],
                         check=False)


def mid_trajectory_starts(record: dict) -> list[Start]:
    """The state before every effective op of ``record`` (replayed exactly), with its history."""
    starts, history = [], History()
    for step in replay_steps(record):
        if step.crossings_after < step.crossings_before:
            starts.append(Start(record, step.index, step.H, step.V, step.crossings_before, history.copy()))
            history.push(step.op, step.crossings_before, step.crossings_after)
    return starts


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _pick(items: Sequence, n: int, rng: np.random.Generator) -> list:
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def setting2_records(records: Sequence[dict], per_pattern: int, seed: int) -> list[dict]:
    """Setting 2's test trajectories: ``per_pattern`` of each zone pattern (all if fewer), drawn with ``seed``."""
    by_pattern: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_pattern[rec["zone_pattern"]].append(rec)
    return [rec for k, pattern in enumerate(sorted(by_pattern))
            for rec in _pick(by_pattern[pattern], per_pattern, _rng(seed, 0, k, 1))]


def record_bound(record: dict) -> int:
    """``bound.crossing_bound`` of a record's zones: no path over them has fewer crossings."""
    return int(crossing_bound(np.asarray(record["zone_grid"], dtype=np.int64).reshape(record["grid_H"],
                                                                                       record["grid_W"])))


# -- the three settings -------------------------------------------------------------------------
def _brute_force_greedy(env: FusionEnv) -> int:
    # reference only: reads every applicable op's delta and takes the best until none improves
    start = env.crossings
    while True:
        cand = env.candidates()
        if cand.size == 0 or cand.delta.min() >= 0:
            return start - env.crossings
        env.apply(cand.op(int(np.argmin(cand.delta))))


def _greedy_setting(starts: list[Start], score, seed: int) -> list[dict]:
    model_runs = drive([greedy_search(s.env(), history=s.history.copy(), rng=_rng(seed, 1, i), guide="model",
                                      initial_crossings=s.record["initial_crossings"])
                        for i, s in enumerate(starts)], score)
    # the same number of op checks as the model search used on the same start, no other limit
    random_runs = drive([greedy_search(s.env(), history=s.history.copy(), rng=_rng(seed, 2, i), guide="random",
                                       initial_crossings=s.record["initial_crossings"], max_tries=m.tries,
                                       max_failures=math.inf, max_steps=math.inf, seed=False)
                         for i, (s, m) in enumerate(zip(starts, model_runs, strict=True))])
    return [{"pattern": s.record["zone_pattern"], "start": s.crossings, "bound": record_bound(s.record),
             "model": m._asdict(), "random": r._asdict(), "oracle": _brute_force_greedy(s.env()),
             "teacher_rest": s.crossings - s.record["final_crossings"]}
            for s, m, r in zip(starts, model_runs, random_runs, strict=True)]


class AnnealGuide(NamedTuple):
    """How setting 2's model-guided annealer uses the model (``search.anneal``'s keywords).

    The defaults were chosen on validation trajectories, never on the test grids the inference table
    reports: ``python examples/fusion/guide_sweep.py`` (the default data's 56 validation
    trajectories, the three default checkpoints of seeds 0-2, two random streams each) ran 12 guides,
    the shares of uniform proposals 0.25 / 0.5 / 0.75 times the temperatures 1 / 2 / 4 / 8. Half the
    proposals uniform with the model's distribution at temperature 4 beat uniform annealing at equal
    proposals on every zone pattern, each pattern's interquartile range above zero, and closed the
    most of the gap of those that did (57.2% against uniform's 54.7%, at 1.6x its CPU time); at
    temperature 1 (the earlier default) it won 3 of 4 patterns, left_right by +0.0 points. The first
    half of the schedule uniform and unscored, re-scored every 100 proposals, come from an earlier
    search (mixing 0.15-0.8, re-scoring every 10-200 proposals or accepted ops, start 0-0.7; two
    2-epoch checkpoints, on test trajectories); the seed-era defaults (0.15, from the start, every
    50) fell below uniform annealing at equal proposals and cost 3x its time.
    """

    explore_prob: float = 0.5  # mixing fraction: share of uniform proposals
    model_temperature: float = 4.0  # tau on the model's proposal distribution (> 1 flattens it)
    model_every: int = 100  # proposals (or accepted ops) between scorings of a changed state
    requery: str = "proposals"  # what model_every counts: "proposals" or "accepted"
    model_start: float = 0.5  # share of the proposals (the hot start) that are uniform, without model calls


def _time_ratios(records: list[dict], model_s: list[float], uniform_s: list[float]) -> dict[str, float]:
    # per zone pattern: the model-guided runs' time (CPU seconds, see search.drive) over the uniform runs' at
    # the same proposals
    by_pattern: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_pattern[rec["zone_pattern"]].append(i)
    return {p: sum(model_s[i] for i in idx) / max(sum(uniform_s[i] for i in idx), 1e-9)
            for p, idx in by_pattern.items()}


def _anneal_summary(run) -> dict[str, Any]:
    # an AnnealResult without its (long) op list: the number of accepted ops instead
    return {**{k: v for k, v in run._asdict().items() if k != "ops"}, "accepted": len(run.ops)}


def record_schedule(record: dict) -> dict[str, float]:
    """The teacher's annealing schedule of a record (``iters``, ``t_max``, ``t_min``), defaults where it has none."""
    return {**SCHEDULE, **{k: record[k] for k in SCHEDULE if k in record}}


def anneal_record(record: dict, kind: str, budget: int, rng: np.random.Generator,
                  guide: AnnealGuide) -> SearchGen:
    """Setting 2's annealing of one record from its initial path: ``kind`` proposals (``search.anneal``'s
    ``guide``) with the record's schedule stretched over ``budget`` proposals."""
    schedule = record_schedule(record)
    return anneal(env_from_record(record), iters=budget, t_max=schedule["t_max"], t_min=schedule["t_min"], rng=rng,
                  guide=kind, initial_crossings=record["initial_crossings"], target=record["final_crossings"],
                  **guide._asdict())


def _anneal_setting(records: list[dict], score, seed: int, iters: int | None, guide: AnnealGuide,
                    time_ratio: float | None = None) -> list[dict]:
    """Model-guided vs uniform annealing at equal proposals, and uniform at equal time: its budget is
    each record's times the pattern's measured model/uniform time ratio (or ``time_ratio``); time is
    CPU seconds of this process (``search.drive``) with the model run on one thread, the wall time of
    a dedicated core. For reference
    the oracle guide (``search.anneal(guide="oracle")``: improving ops drawn where the model's
    proposals would be) at equal proposals."""
    def runs(kind: str, key: int, budgets: list[int]):
        return [anneal_record(rec, kind, budget, _rng(seed, key, i), guide)
                for i, (rec, budget) in enumerate(zip(records, budgets, strict=True))]

    budgets = [iters or record_schedule(rec)["iters"] for rec in records]
    model_s, uniform_s, timed_s = [0.0] * len(records), [0.0] * len(records), [0.0] * len(records)
    # CPU seconds count every thread of the process: torch's idle intra-op threads would bill the model-guided
    # runs for cores they do not use (12.9x instead of 1.6x uniform's time with 2 threads), so one thread scores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_runs = drive(runs("model", 3, budgets), score, clock=model_s)
    finally:
        torch.set_num_threads(threads)
    uniform_runs = drive(runs("uniform", 4, budgets), clock=uniform_s)
    ratios = _time_ratios(records, model_s, uniform_s)
    if time_ratio is not None:
        ratios = dict.fromkeys(ratios, float(time_ratio))
    timed_budgets = [max(1, round(b * ratios[rec["zone_pattern"]])) for rec, b in zip(records, budgets)]
    timed_runs = drive(runs("uniform", 7, timed_budgets), clock=timed_s)
    oracle_runs = drive(runs("oracle", 8, budgets))
    return [{"pattern": rec["zone_pattern"], "initial": rec["initial_crossings"], "bound": record_bound(rec),
             "budget": m.iters, "teacher": rec["initial_crossings"] - rec["final_crossings"],
             "teacher_final": rec["final_crossings"], "time_ratio": ratios[rec["zone_pattern"]],
             "seconds": {"model": ms, "uniform": us, "uniform_time": ts},
             "model": _anneal_summary(m), "uniform": _anneal_summary(u), "uniform_time": _anneal_summary(t),
             "oracle": _anneal_summary(o)}
            for rec, m, u, t, o, ms, us, ts in zip(records, model_runs, uniform_runs, timed_runs, oracle_runs, model_s,
                                                    uniform_s, timed_s, strict=True)]


def _seed_protocol_setting(records: list[dict], score, seed: int) -> list[dict]:
    def start(rec: dict) -> dict:
        return {"env": env_from_record(rec), "history": History(), "initial_crossings": rec["initial_crossings"]}

    model_runs = drive([greedy_search(**start(rec), rng=_rng(seed, 5, i), guide="model")
                        for i, rec in enumerate(records)], score)
    random_runs = drive([greedy_search(**start(rec), rng=_rng(seed, 6, i), guide="random", max_tries=m.tries,
                                       max_failures=math.inf, max_steps=math.inf, seed=False)
                         for i, (rec, m) in enumerate(zip(records, model_runs, strict=True))])
    return [{"pattern": rec["zone_pattern"], "initial": rec["initial_crossings"], "bound": record_bound(rec),
             "teacher_initial": rec.get("recorded_initial_crossings", rec["initial_crossings"]),
             "teacher_final": rec["final_crossings"], "model": m._asdict(), "random": r._asdict()}
            for rec, m, r in zip(records, model_runs, random_runs, strict=True)]


def run_evaluation(model: torch.nn.Module, data_dir: str | Path | None, *, n_per_pattern: int | None = 16,
                   seed: int = 0, device: str | torch.device = "cpu", smoke: bool = False,
                   anneal_per_pattern: int | None = None, anneal_iters: int | None = None,
                   guide: AnnealGuide | None = None, time_ratio: float | None = None, max_batch: int = 32,
                   test_records: list[dict] | None = None, settings: Sequence[int] = (1, 2, 3)) -> dict[str, Any]:
    """The three settings on the test split of ``data_dir`` (or on ``test_records``); a JSON-able
    dict (see ``format_table``).

    Args:
        model: a FusionNet (already on ``device``); run in eval mode, its training flag restored.
        data_dir: a dataset directory; its test split is used unless ``test_records`` is given.
        n_per_pattern: setting 1 start states per zone pattern (None = 16), drawn with ``seed``
            from the effective ops of all test trajectories of that pattern; also setting 3's
            trajectories per zone pattern (the seed's was 25).
        anneal_per_pattern: setting 2 test trajectories per zone pattern (None = ``n_per_pattern // 2``, >= 1).
        anneal_iters: setting 2 op budget (None = each record's own ``iters``).
        guide: how setting 2's model-guided annealer uses the model (None = :class:`AnnealGuide`'s defaults).
        time_ratio: setting 2's equal-time uniform budget as a multiple of the proposal budget (None =
            measured: the pattern's model-guided over uniform CPU seconds at equal proposals).
        smoke: at most 2 starts/trajectories and 1 annealed trajectory per pattern, 150 annealing proposals.
        test_records: held-out records (``trajectories.load_trajectories`` of a file in the seed's
            format, or teacher records) used instead of the test split.
        settings: which of the three settings to run (the others are left out of the result).

    Returns:
        ``{"setting1": {pattern | "overall": row}, "setting2": {...}, "setting3": {...}, "overall":
        setting 1's overall row, "guide": setting 2's AnnealGuide, "seed", "n_test_trajectories",
        "runtime_s", "descriptions"}``; rows hold ``model_*``/``random_*`` (settings 1, 3) or
        ``model_*``/``uniform_*``/``uniform_time_*`` (setting 2) means and ``*_gap_closed`` (the share
        of the gap to the region bound closed, ``bound.gap_closed``; ``teacher_*`` = the record's
        own result); ``*_fraction`` values are in ``[0, 1]``, ``*_pct`` in percent, a mean over no
        items is ``None``.
    """
    started = time.perf_counter()
    n_per_pattern = 16 if n_per_pattern is None else n_per_pattern
    anneal_n = max(1, n_per_pattern // 2) if anneal_per_pattern is None else anneal_per_pattern
    if smoke:
        n_per_pattern, anneal_n, anneal_iters = min(n_per_pattern, 2), min(anneal_n, 1), min(anneal_iters or 150, 150)
    records = load_split_records(data_dir) if test_records is None else test_records
    by_pattern: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_pattern[rec["zone_pattern"]].append(rec)
    starts, seed_records = [], []
    for k, pattern in enumerate(sorted(by_pattern)):
        recs = by_pattern[pattern]
        pool = [s for rec in recs for s in mid_trajectory_starts(rec)]
        starts += _pick(pool, n_per_pattern, _rng(seed, 0, k, 0))
        seed_records += _pick(recs, n_per_pattern, _rng(seed, 0, k, 2))
    anneal_records = setting2_records(records, anneal_n, seed)
    if not settings or not set(settings) <= {1, 2, 3}:
        raise ValueError(f"settings: expected a non-empty subset of (1, 2, 3), got {settings}")
    guide = AnnealGuide() if guide is None else guide
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        score = model_scorer(model, device=device, max_batch=max_batch)
        if 1 in settings:
            results["setting1"] = rows_by_pattern(_greedy_setting(starts, score, seed), greedy_row)
        if 2 in settings:
            annealed = _anneal_setting(anneal_records, score, seed, anneal_iters, guide, time_ratio)
            results["setting2"] = rows_by_pattern(annealed, anneal_row)
        if 3 in settings:
            results["setting3"] = rows_by_pattern(_seed_protocol_setting(seed_records, score, seed), seed_protocol_row)
    finally:
        model.train(was_training)
    descriptions = {
        "setting1": "greedy from mid-trajectory states (an improving op exists): model-ranked vs random "
                    "order, same number of op checks; oracle = brute-force greedy over all deltas",
        "setting2": "annealing from the initial paths (nearly local minima), teacher schedule: model-guided "
                    "(a mix of model-weighted and uniform proposals, see guide) vs uniform proposals (the teacher) at "
                    "the same proposal budget, and uniform at the same time (CPU seconds); teacher = the record's "
                    "result",
        "setting3": "the seed's inference protocol from the initial paths (history seeding, K x 8 "
                    "per-hypothesis candidates, exploration 0.15, adaptive give-up) vs random order at the "
                    "same op checks; teacher = the record's initial -> final",
        "gap_closed": "(initial - final) / (initial - bound) summed over the grids, bound = connected zone "
                      "regions - 1 (no path has fewer crossings); setting 1 starts mid-trajectory",
    }
    return {
        "seed": seed, "smoke": smoke, "n_test_trajectories": len(records),
        "test_source": "test split" if test_records is None else "test_records",
        **results, "overall": results.get("setting1", {}).get("overall"), "guide": guide._asdict(),
        "runtime_s": round(time.perf_counter() - started, 2),
        "descriptions": {k: v for k, v in descriptions.items() if not k.startswith("setting") or k in results},
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    from fusion.model import FusionNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a CheckpointManager directory (its best) or one step_* checkpoint in it")
    parser.add_argument("--data", type=Path, default=None, help="dataset directory (its test split)")
    parser.add_argument("--test-trajectories", type=Path, default=None, metavar="FILE.jsonl",
                        help="held-out trajectories in the seed's JSONL format, instead of the test split")
    parser.add_argument("--n-per-pattern", type=int, default=16)
    parser.add_argument("--anneal-iters", type=int, default=None, help="setting 2 proposals (default: the record's)")
    parser.add_argument("--anneal-per-pattern", type=int, default=None,
                        help="setting 2 trajectories per zone pattern (default n-per-pattern // 2)")
    defaults = AnnealGuide()
    parser.add_argument("--explore-prob", type=float, default=defaults.explore_prob,
                        help="setting 2: share of uniform proposals in the model-guided annealer")
    parser.add_argument("--model-temperature", type=float, default=defaults.model_temperature,
                        help="setting 2: temperature on the model's proposal distribution")
    parser.add_argument("--model-every", type=int, default=defaults.model_every,
                        help="setting 2: re-score a changed state every N proposals (or accepted ops, --requery)")
    parser.add_argument("--requery", choices=("proposals", "accepted"), default=defaults.requery)
    parser.add_argument("--model-start", type=float, default=defaults.model_start,
                        help="setting 2: share of the proposals (the hot start) made uniformly, before any model call")
    parser.add_argument("--time-ratio", type=float, default=None,
                        help="setting 2: equal-time uniform budget as a multiple of the proposals (default measured)")
    parser.add_argument("--settings", default="1,2,3", help="which settings to run, e.g. 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.test_trajectories is None):
        parser.error("give one of --data (its test split) and --test-trajectories")
    test_records = None
    if args.test_trajectories is not None:
        test_records, counts = load_trajectories(args.test_trajectories)
        print(f"test trajectories {args.test_trajectories}: {format_counts(counts)}")
    net = FusionNet(**(saved_model_config(args.checkpoint) or {})).to(args.device)
    loaded = load_checkpoint(args.checkpoint, net)
    guide = AnnealGuide(args.explore_prob, args.model_temperature, args.model_every, args.requery, args.model_start)
    results = run_evaluation(net, args.data, n_per_pattern=args.n_per_pattern, seed=args.seed, device=args.device,
                             smoke=args.smoke, anneal_per_pattern=args.anneal_per_pattern,
                             anneal_iters=args.anneal_iters, guide=guide, time_ratio=args.time_ratio,
                             test_records=test_records, settings=[int(v) for v in args.settings.split(",")])
    print(f"checkpoint {loaded['path']}\n{format_table(results)}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
