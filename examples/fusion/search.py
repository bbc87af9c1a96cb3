"""Searches over FusionEnv operations: greedy descent (model-ranked or random order), history
seeding and annealing (model-guided proposals mixed with uniform ones, uniform proposals as the
teacher draws them, or an improving-op oracle for reference).

Every search only ever *checks* one proposed op at a time (``FusionEnv.evaluate``, one try each)
and applies it only when the check says it applies, so no invalid op is ever applied and the
path stays one Hamiltonian path. ``FusionEnv.candidates()`` (every applicable op with its delta)
is used by the annealers exactly as the teacher uses it, as the pool to propose from; the greedy
searches never see it (picking by the deltas of all ops is the brute-force baseline).

The searches are model-agnostic generators: when one needs the model's view of its current state
it yields a :class:`ScoreRequest` and expects :class:`Scores` back. :func:`drive` runs many
searches side by side and hands all pending requests to one scoring function, which can batch
them through the model (``infer.model_scorer``).
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from fusion.encoding import HISTORY, legal_anchor_mask, state_channels
from fusion.env import FusionEnv
from fusion.ops import OPS, Op
from fusion.teacher import temperature

__all__ = [
    "AnnealResult",
    "History",
    "Ranked",
    "ScoreRequest",
    "Scores",
    "SearchResult",
    "SeedResult",
    "anneal",
    "drive",
    "give_up_limits",
    "greedy_search",
    "legal_anchors",
    "model_ranking",
    "proposal_prior",
    "random_ranking",
    "seed_history",
]

N_ACTIONS = len(OPS)
_WIDTHS = np.array([s.width for s in OPS])
_HEIGHTS = np.array([s.height for s in OPS])


class History:
    """The last 32 effective ops ``(action, y, x, crossings before, crossings after)``, oldest first."""

    def __init__(self, entries: Sequence[Sequence[float]] = ()) -> None:
        self.entries: deque[tuple[float, ...]] = deque((tuple(e) for e in entries), maxlen=HISTORY)

    @classmethod
    def from_array(cls, array: np.ndarray, length: int) -> History:
        return cls(np.asarray(array)[:length].tolist())

    def push(self, op: Op, before: int, after: int) -> None:
        self.entries.append((op.variant, op.y, op.x, before, after))

    def array(self) -> np.ndarray:
        """``(32, 5)`` float32, zero padded: the model's history input."""
        out = np.zeros((HISTORY, 5), dtype=np.float32)
        if self.entries:
            out[: len(self.entries)] = self.entries
        return out

    def copy(self) -> History:
        return History(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class ScoreRequest(NamedTuple):
    """What the model needs to score a state (``env`` is live: score it before resuming the search)."""

    env: FusionEnv
    history: History
    initial_crossings: int


class Scores(NamedTuple):
    """The model's view of one state: ``position (K, h, w)`` per-hypothesis probabilities over the
    legal anchors (0 on masked ones), ``action (12, h, w)`` per-pixel action probabilities."""

    position: np.ndarray
    action: np.ndarray


class Ranked(NamedTuple):
    """Ops in the order a greedy search checks them: ``ops (n, 3)`` int64 rows ``(variant, y, x)``,
    ``tier (n,)`` the step each op belongs to (non-decreasing), ``weight (n,)`` its sampling weight."""

    ops: np.ndarray
    tier: np.ndarray
    weight: np.ndarray


def give_up_limits(initial_crossings: int) -> tuple[int, int]:
    """The seed's adaptive give-up (Change 9): ``(max_failures, max_steps) =
    (max(30, 2 * initial), max(150, 5 * initial))``."""
    return max(30, 2 * int(initial_crossings)), max(150, 5 * int(initial_crossings))


def legal_anchors(env: FusionEnv) -> np.ndarray:
    """``(h, w)`` bool, True where an op anchored there can change crossings (the inverse of
    ``encoding.legal_anchor_mask``; it depends on the zones only, so it never changes in a search)."""
    state = torch.from_numpy(state_channels(env.zones, env.H, env.V)[None])
    return ~legal_anchor_mask(state)[0].numpy()


def _fits(variants: np.ndarray, ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    # the window lies inside the grid: pure geometry, known to every guide alike
    return (ys <= h - _HEIGHTS[variants]) & (xs <= w - _WIDTHS[variants])


def model_ranking(scores: Scores, legal: np.ndarray, *, top_k_per_hyp: int = 8, top_k_act: int = 3) -> Ranked:
    """The seed's per-hypothesis candidate selection (Change 8), extended to every legal anchor.

    Each hypothesis ranks the legal anchors by its own probability; an anchor's tier is
    ``min_k rank_k // top_k_per_hyp``, so tier 0 is the union of every hypothesis' top
    ``top_k_per_hyp`` (de-duplicated by position), tier 1 the next ones, and so on; within a
    tier, anchors go by their maximum probability over hypotheses. Each anchor contributes its
    ``top_k_act`` most probable actions whose window fits the grid.
    """
    k, h, w = scores.position.shape
    flat = scores.position.reshape(k, h * w)
    anchors = np.flatnonzero(legal.ravel())
    if anchors.size == 0:
        return Ranked(np.zeros((0, 3), np.int64), np.zeros(0, np.int64), np.zeros(0))
    probs = flat[:, anchors]
    order = np.argsort(-probs, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(anchors.size)[None].repeat(k, 0), axis=1)
    tier = rank.min(0) // top_k_per_hyp
    best = probs.max(0)
    pos_order = np.lexsort((-best, tier))
    anchors, tier, best = anchors[pos_order], tier[pos_order], best[pos_order]
    ys, xs = anchors // w, anchors % w
    act = scores.action[:, ys, xs]  # (12, n)
    top = np.argsort(-act, axis=0, kind="stable")[:top_k_act]  # (top_k_act, n)
    variants = top.T.ravel()
    rep = np.repeat(np.arange(anchors.size), top.shape[0])
    weight = best[rep] * act[variants, rep]
    ops = np.stack([variants, ys[rep], xs[rep]], 1).astype(np.int64)
    keep = _fits(ops[:, 0], ops[:, 1], ops[:, 2], h, w)
    return Ranked(ops[keep], tier[rep][keep].astype(np.int64), weight[keep])


def random_ranking(legal: np.ndarray, rng: np.random.Generator, *, step_size: int = 96) -> Ranked:
    """Every in-bounds (legal anchor, action) pair in uniformly random order, ``step_size`` per tier."""
    h, w = legal.shape
    ys, xs = np.nonzero(legal)
    variants = np.repeat(np.arange(N_ACTIONS), ys.size)
    ys, xs = np.tile(ys, N_ACTIONS), np.tile(xs, N_ACTIONS)
    keep = _fits(variants, ys, xs, h, w)
    ops = np.stack([variants[keep], ys[keep], xs[keep]], 1).astype(np.int64)
    ops = ops[rng.permutation(ops.shape[0])]
    return Ranked(ops, np.arange(ops.shape[0]) // step_size, np.ones(ops.shape[0]))


def _apply_if_improving(env: FusionEnv, op: Op, history: History) -> bool:
    """Check ``op`` (one try); apply it and record it in ``history`` only if it lowers crossings."""
    result = env.evaluate(op)
    if not (result.ok and result.delta < 0):
        return False
    before = env.crossings
    env.apply(op)
    history.push(op, before, env.crossings)
    return True


class SeedResult(NamedTuple):
    ops: list[Op]  # the improving ops applied, in order
    tries: int  # op checks spent
    first_improvement: int | None  # tries up to and including the first improving check


def seed_history(env: FusionEnv, history: History, rng: np.random.Generator, *, tries: int = 50, keep: int = 5,
                 legal: np.ndarray | None = None) -> SeedResult:
    """History seeding (the seed's Change 10): check up to ``tries`` random in-bounds ops at legal
    anchors and apply (and push onto ``history``) only those that reduce crossings, at most ``keep``."""
    legal = legal_anchors(env) if legal is None else legal
    pool = random_ranking(legal, rng, step_size=1).ops
    kept: list[Op] = []
    used, first = 0, None
    for row in pool[:tries]:
        if len(kept) >= keep:
            break
        used += 1
        op = Op(*map(int, row))
        if _apply_if_improving(env, op, history):
            kept.append(op)
            first = used if first is None else first
    return SeedResult(kept, used, first)


class SearchResult(NamedTuple):
    initial: int  # crossings at the start
    final: int  # crossings at the end
    ops: list[Op]  # every applied op in order (seeded ones first); each one improved crossings
    tries: int  # op checks, seeding included
    first_improvement: int | None  # tries up to and including the first improving check
    steps: int  # ranked batches examined (model calls happen only after a state change)
    seeded: int  # ops applied by history seeding
    reason: str  # why it stopped: "failures", "steps", "budget" or "exhausted"


SearchGen = Generator[ScoreRequest, Scores, Any]


def greedy_search(env: FusionEnv, *, history: History, initial_crossings: int, rng: np.random.Generator,
                  guide: str = "model", max_tries: float = math.inf, max_failures: float | None = None,
                  max_steps: float | None = None, top_k_per_hyp: int = 8, top_k_act: int = 3,
                  explore_prob: float = 0.15, step_size: int = 96, seed: bool = True,
                  seed_tries: int = 50, seed_keep: int = 5) -> SearchGen:
    """Greedy descent: check ranked ops one at a time, apply the first that lowers crossings, re-rank.

    A generator (run it with :func:`drive`): with ``guide="model"`` it yields a
    :class:`ScoreRequest` after every state change and ranks by :func:`model_ranking`; with
    ``"random"`` it never yields and checks :func:`random_ranking`'s order. A *step* checks one
    tier; with probability ``explore_prob`` (model only, the seed's Change 11) one not-yet-checked
    op, sampled by its weight, is checked first. Ops already checked on the unchanged state are
    skipped (re-checking is deterministic, so the seed's repeats only wasted tries). With an empty
    ``history`` and ``seed``, history seeding runs first; its tries count. Stops at ``max_tries``
    checks, after ``max_failures`` consecutive steps without improvement, after ``max_steps``
    steps (both default to :func:`give_up_limits` of ``initial_crossings``) or when every ranked
    op of the current state has been checked. ``env`` and ``history`` are changed in place.
    """
    if guide not in ("model", "random"):
        raise ValueError(f"guide: expected 'model' or 'random', got {guide!r}")
    default_failures, default_steps = give_up_limits(initial_crossings)
    max_failures = default_failures if max_failures is None else max_failures
    max_steps = default_steps if max_steps is None else max_steps
    start, legal = env.crossings, legal_anchors(env)
    ops: list[Op] = []
    tries, first, seeded = 0, None, 0
    if seed and len(history) == 0:
        sres = seed_history(env, history, rng, tries=int(min(seed_tries, max_tries)), keep=seed_keep, legal=legal)
        ops += sres.ops
        tries, first, seeded = sres.tries, sres.first_improvement, len(sres.ops)
    failures = steps = 0
    ranked, tried = None, None
    while True:
        if tries >= max_tries:
            reason = "budget"
            break
        if steps >= max_steps:
            reason = "steps"
            break
        if failures >= max_failures:
            reason = "failures"
            break
        if ranked is None:
            if guide == "model":
                scores = yield ScoreRequest(env, history, initial_crossings)
                ranked = model_ranking(scores, legal, top_k_per_hyp=top_k_per_hyp, top_k_act=top_k_act)
            else:
                ranked = random_ranking(legal, rng, step_size=step_size)
            tried = np.zeros(ranked.ops.shape[0], dtype=bool)
        untried = np.flatnonzero(~tried)
        if untried.size == 0:
            reason = "exhausted"
            break
        batch = untried[ranked.tier[untried] == ranked.tier[untried[0]]].tolist()
        if guide == "model" and rng.random() < explore_prob:
            w = ranked.weight[untried]
            pick = int(rng.choice(untried, p=w / w.sum())) if w.sum() > 0 else int(rng.choice(untried))
            batch = [pick] + [j for j in batch if j != pick]
        steps += 1
        improved = False
        for j in batch:
            if tries >= max_tries:
                break
            tried[j] = True
            tries += 1
            op = Op(*map(int, ranked.ops[j]))
            if _apply_if_improving(env, op, history):
                ops.append(op)
                first = tries if first is None else first
                improved, ranked = True, None
                break
        failures = 0 if improved else failures + 1
    return SearchResult(start, env.crossings, ops, tries, first, steps, seeded, reason)


class AnnealResult(NamedTuple):
    initial: int
    best: int  # lowest crossings visited
    final: int  # crossings after the last proposal
    iters: int  # proposals made (the op budget)
    best_at: int  # proposals used when the best was first reached (0 = the start)
    reached_at: int | None  # proposals used when crossings first were <= target (None = never)
    ops: list[Op]  # every accepted op, in order
    model_calls: int = 0  # states scored by the model


def proposal_prior(scores: Scores, *, temperature: float = 1.0) -> np.ndarray:
    r"""The model-guided annealer's unnormalised proposal weight of every op ``(v, y, x)``:
    :math:`(\max_k p_k(y, x)\, p(v \mid y, x))^{1/\tau}`, ``tau = temperature``.

    Shapes:
        - scores.position: ``(K, h, w)``; scores.action: ``(12, h, w)``
        - output: ``(12, h, w)`` float, indexed ``[variant, y, x]``
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    prior = scores.position.max(0)[None] * scores.action
    return prior if temperature == 1.0 else prior ** (1.0 / temperature)


def anneal(env: FusionEnv, *, iters: int, t_max: float, t_min: float, rng: np.random.Generator,
           guide: str = "uniform", history: History | None = None, initial_crossings: int | None = None,
           explore_prob: float = 0.5, model_temperature: float = 4.0, model_every: int = 100,
           requery: str = "proposals", model_start: float = 0.5, target: int | None = None) -> SearchGen:
    r"""Simulated annealing with the teacher's schedule (``teacher.temperature``) and acceptance.

    Each iteration proposes one op from the applicable pool (``env.candidates()``, rebuilt after
    every accepted op, as the teacher does) and accepts it if its change ``d <= 0``, otherwise with
    probability ``exp(-d / T)`` (never at ``T <= 0``). Only the proposed op's own change is looked
    at. ``guide="uniform"`` draws uniformly from the pool and consumes ``rng`` exactly like
    ``teacher.run_teacher`` (same rng -> same run).

    ``guide="model"`` mixes two proposals: with probability ``explore_prob`` (the mixing fraction)
    uniform, as above, so the neutral and uphill moves annealing walks through stay reachable;
    otherwise op ``(v, y, x)`` of the pool with probability

    .. math::
        q(v, y, x) \propto \big(\max_k p_k(y, x)\; p(v \mid y, x)\big)^{1/\tau}

    from the model's scores (zero off the legal anchors; uniform when no pool op has weight),
    ``tau = model_temperature`` (> 1 flattens the model's preference, < 1 sharpens it). The
    generator yields a :class:`ScoreRequest` at the start and then re-scores a changed state:
    with ``requery="proposals"`` at every ``model_every``-th proposal after at least one accepted
    op, with ``"accepted"`` once ``model_every`` ops were accepted since the last scoring. Between
    scorings the last scores are reused on the current pool (one cumulative sum per pool, one
    binary search per proposal). With ``model_start`` (a fraction of ``iters``) the first
    ``model_start * iters`` proposals, the hot phase where annealing wanders, are uniform and the
    model is first called after them. Improving accepted ops are pushed onto ``history``. The
    defaults are ``infer.AnnealGuide``'s, picked by measurement (see there).

    ``guide="oracle"`` is a reference, not a search (it reads every pool op's change): the model's
    proposals are replaced by a uniform draw among the pool's improving ops (uniform when there is
    none), with the same mixing and start; the best any improving-op proposer could do.
    """
    if guide not in ("model", "uniform", "oracle"):
        raise ValueError(f"guide: expected 'model', 'uniform' or 'oracle', got {guide!r}")
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    if not 0.0 <= explore_prob <= 1.0:
        raise ValueError(f"explore_prob: expected a probability in [0, 1], got {explore_prob}")
    if not model_temperature > 0:
        raise ValueError(f"model_temperature: expected > 0, got {model_temperature}")
    if model_every < 1:
        raise ValueError(f"model_every: expected >= 1, got {model_every}")
    if requery not in ("proposals", "accepted"):
        raise ValueError(f"requery: expected 'proposals' or 'accepted', got {requery!r}")
    if not 0.0 <= model_start <= 1.0:
        raise ValueError(f"model_start: expected a fraction of iters in [0, 1], got {model_start}")
    first_guided = iters if guide == "uniform" else math.ceil(model_start * iters)
    history = History() if history is None else history
    initial_crossings = env.crossings if initial_crossings is None else initial_crossings
    start = best = env.crossings
    best_at, reached_at = 0, (0 if target is not None and start <= target else None)
    ops: list[Op] = []
    pool = env.candidates()
    prior, cdf, changed, calls = None, None, 0, 0  # changed: ops accepted since the last scoring
    for i in range(iters):
        if guide == "model" and i >= first_guided and (prior is None or (changed > 0 and (
                i % model_every == 0 if requery == "proposals" else changed >= model_every))):
            scores = yield ScoreRequest(env, history, initial_crossings)
            prior = proposal_prior(scores, temperature=model_temperature)
            cdf, changed, calls = None, 0, calls + 1
        if pool.size == 0:
            continue
        if i < first_guided or (explore_prob > 0 and rng.random() < explore_prob):
            j = int(rng.integers(pool.size))
        elif guide == "oracle":
            improving = np.flatnonzero(pool.delta < 0)
            j = int(improving[rng.integers(improving.size)] if improving.size else rng.integers(pool.size))
        else:
            if cdf is None:  # the pool's weights, only once a model proposal needs them
                cdf = np.cumsum(prior.take(pool.variant * prior[0].size + pool.y * prior.shape[2] + pool.x),
                                dtype=np.float64)
            j = (int(rng.integers(pool.size)) if cdf[-1] <= 0
                 else min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), pool.size - 1))
        op = pool.op(j)
        delta = int(pool.delta[j])  # the proposed op's own change, as env.evaluate(op) gives it
        if delta > 0:
            t = temperature(i, iters, t_max, t_min)
            if t <= 0 or rng.random() >= math.exp(-delta / t):
                continue
        before = env.crossings
        if not env.apply(op).ok:  # cannot happen with an exact pool; never apply blindly anyway
            raise RuntimeError(f"pool op {op} does not apply")
        ops.append(op)
        if env.crossings < before:
            history.push(op, before, env.crossings)
        if env.crossings < best:
            best, best_at = env.crossings, i + 1
        if reached_at is None and target is not None and env.crossings <= target:
            reached_at = i + 1
        pool, cdf, changed = env.candidates(), None, changed + 1
    return AnnealResult(start, best, env.crossings, iters, best_at, reached_at, ops, calls)


def drive(searches: Sequence[SearchGen], score: Callable[[list[ScoreRequest]], list[Scores]] | None = None, *,
          clock: list[float] | None = None) -> list:
    """Run search generators side by side; every round, all pending requests go to ``score`` in one
    call (so it can batch them through the model). Returns each search's result, in order.

    With ``clock`` (a list of ``len(searches)`` floats), each search's CPU seconds (``time.process_time``:
    the wall time of a process that has its cores to itself, and unlike wall time not inflated by
    other jobs on a shared machine) are added to its entry: the time spent in its own steps plus an
    equal share of every scoring call it was part of.
    """
    if clock is not None and len(clock) != len(searches):
        raise ValueError(f"clock: expected {len(searches)} entries (one per search), got {len(clock)}")
    results: list = [None] * len(searches)
    pending: dict[int, ScoreRequest] = {}

    def advance(i: int, value: Scores | None) -> None:
        t0 = time.process_time()
        try:
            pending[i] = searches[i].send(value)
        except StopIteration as stop:
            results[i] = stop.value
        if clock is not None:
            clock[i] += time.process_time() - t0

    for i in range(len(searches)):
        advance(i, None)
    while pending:
        if score is None:
            raise ValueError("score: a search asked for model scores but no scoring function was given")
        batch = list(pending.items())
        pending.clear()
        t0 = time.process_time()
        scored = score([request for _, request in batch])
        if clock is not None:
            share = (time.process_time() - t0) / len(batch)
            for i, _ in batch:
                clock[i] += share
        for (i, _), scores in zip(batch, scored, strict=True):
            advance(i, scores)
    return results
