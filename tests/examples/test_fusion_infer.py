"""FusionNet inference: searches never apply an invalid op, the seed's give-up / seeding / ranking
rules, equal budgets for the baselines, annealing acceptance, and the evaluation's structure.

The model is untrained (random weights): these tests prove the mechanics, not the quality.
"""
import json
import math

import numpy as np
import pytest
import torch
from fusion import infer
from fusion.encoding import legal_anchor_mask, state_channels
from fusion.env import FusionEnv
from fusion.grid import count_crossings, is_hamiltonian_path
from fusion.infer import (
    _greedy_setting,
    _seed_protocol_setting,
    format_table,
    load_split_records,
    mid_trajectory_starts,
    model_scorer,
    run_evaluation,
)
from fusion.inference_table import greedy_row, seed_protocol_row
from fusion.model import FusionNet
from fusion.ops import OPS, Op
from fusion.search import (
    History,
    ScoreRequest,
    Scores,
    anneal,
    drive,
    give_up_limits,
    greedy_search,
    legal_anchors,
    model_ranking,
    seed_history,
)
from fusion.teacher import env_from_record, run_teacher
from fusion_datasets import write_split_records

PATTERNS = ("islands", "left_right", "stripes", "voronoi")


class RecordingEnv(FusionEnv):
    """Logs every check and every apply; with ``require_check`` an apply must follow a successful
    check of the same op (the annealers check through the teacher's exact pool instead)."""

    def __init__(self, *args, require_check=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks, self.applied, self.require_check = [], [], require_check

    def evaluate(self, op):
        result = super().evaluate(op)
        self.checks.append((Op(*op), result, self.crossings))
        return result

    def apply(self, op):
        if self.require_check:
            assert self.checks and self.checks[-1][0] == Op(*op) and self.checks[-1][1].ok, f"{op} applied unchecked"
        before, n = self.crossings, len(self.checks)
        result = super().apply(op)
        del self.checks[n:]  # FusionEnv.apply checks once more internally: not one of the search's tries
        assert result.ok, f"applied an invalid op {op}: {result.status}"
        self.applied.append((Op(*op), before, self.crossings))
        return result


def recording(env: FusionEnv, require_check: bool = True) -> RecordingEnv:
    return RecordingEnv(env.zones, env.H, env.V, zone_pattern=env.zone_pattern, init_pattern=env.init_pattern,
                        require_check=require_check)


def assert_valid_path(env: FusionEnv) -> None:
    assert is_hamiltonian_path(env.H, env.V)
    assert env.crossings == count_crossings(env.H, env.V, env.zones)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    return {p: [run_teacher(12, 12, p, seed=s, iters=800) for s in range(3)] for p in PATTERNS}


@pytest.fixture(scope="module")
def starts(records):
    return {p: [s for rec in recs for s in mid_trajectory_starts(rec)] for p, recs in records.items()}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FusionNet(widths=(8, 16, 16, 16), rnn_hidden=16).eval()


def test_mid_trajectory_starts_are_improvable_states_with_their_history(records, starts):
    for pattern in PATTERNS:
        for rec in records[pattern]:
            mine = mid_trajectory_starts(rec)
            assert len(mine) > 0
            for j, s in enumerate(mine):
                env = s.env()
                assert env.crossings == s.crossings > rec["final_crossings"]
                assert env.candidates().delta.min() < 0  # an improving op exists
                op = Op.from_record(rec["sequence_ops"][s.index])
                assert env.evaluate(op).delta < 0  # the teacher's own next op is the effective one
                assert len(s.history) == min(j, 32)
                if j:  # the previous effective op, then only neutral or uphill ops up to here
                    prev = mine[j - 1]
                    assert s.history.entries[-1] == (*Op.from_record(rec["sequence_ops"][prev.index]),
                                                     prev.crossings, s.history.entries[-1][4])
                    assert s.history.entries[-1][4] < prev.crossings and s.history.entries[-1][4] <= s.crossings


def test_bad_guides_and_missing_scorer_are_rejected(records):
    env = env_from_record(records["voronoi"][0])
    with pytest.raises(ValueError, match="guide"):
        drive([greedy_search(env, history=History(), initial_crossings=9, rng=np.random.default_rng(0), guide="x")])
    with pytest.raises(ValueError, match="guide"):
        drive([anneal(env, iters=5, t_max=1, t_min=1, rng=np.random.default_rng(0), guide="model_free")])
    with pytest.raises(ValueError, match="score"):
        drive([greedy_search(env, history=History(), initial_crossings=9, rng=np.random.default_rng(0))])


def test_give_up_limits_follow_the_seed():
    for initial in range(0, 120):
        assert give_up_limits(initial) == (max(30, 2 * initial), max(150, 5 * initial))
    assert give_up_limits(10) == (30, 150) and give_up_limits(40) == (80, 200)


@pytest.mark.parametrize("guide", ["model", "random"])
def test_greedy_search_never_applies_an_invalid_op(starts, model, guide):
    score, applied, rejected = model_scorer(model), 0, 0
    for pattern in PATTERNS:
        for i, s in enumerate(starts[pattern][:4]):
            env = recording(s.env())
            [res] = drive([greedy_search(env, history=s.history.copy(), initial_crossings=s.record["initial_crossings"],
                                         rng=np.random.default_rng(i), guide=guide, max_tries=600)], score)
            assert res.tries == len(env.checks) <= 600
            assert [a[0] for a in env.applied] == res.ops
            for _, before, after in env.applied:  # each applied op was checked, applicable and improving
                assert after < before
            rejected += sum(not r.ok for _, r, _ in env.checks)
            applied += len(res.ops)
            assert_valid_path(env)
            assert res.final == env.crossings == res.initial - sum(b - a for _, b, a in env.applied)
            fresh = s.env()  # the same ops replay from the start state
            for op in res.ops:
                assert fresh.apply(op).ok
            np.testing.assert_array_equal(fresh.H, env.H)
            np.testing.assert_array_equal(fresh.V, env.V)
    assert applied > 0 and rejected > 0  # it met inapplicable proposals and only rejected them


def test_greedy_search_rejects_a_ranking_of_only_inapplicable_ops(starts):
    s = starts["voronoi"][0]
    env = recording(s.env())
    h, w = env.zones.shape
    cand = env.candidates()
    action = np.ones((12, h, w), np.float32)
    action[cand.variant, cand.y, cand.x] = 0.0  # the applicable variant of each anchor ranks last
    position = np.random.default_rng(0).random((4, h, w)).astype(np.float32)
    H0, V0 = env.H.copy(), env.V.copy()
    [res] = drive([greedy_search(env, history=s.history.copy() or History([(0, 0, 0, 9, 8)]), initial_crossings=20,
                                 rng=np.random.default_rng(0), max_failures=math.inf, max_steps=math.inf)],
                  lambda reqs: [Scores(position, action)] * len(reqs))
    assert (res.reason, res.ops, res.final) == ("exhausted", [], res.initial)
    assert res.tries == len(env.checks) > 100 and not any(r.ok for _, r, _ in env.checks)
    np.testing.assert_array_equal(env.H, H0)
    np.testing.assert_array_equal(env.V, V0)


def test_greedy_search_stops_after_max_failures_consecutive_failures(records):
    env = env_from_record(records["left_right"][0])  # the zigzag: no single op improves it
    assert env.candidates().delta.min() >= 0
    initial = env.crossings
    max_failures, _ = give_up_limits(initial)
    [res] = drive([greedy_search(env, history=History(), initial_crossings=initial, rng=np.random.default_rng(0),
                                 guide="random", step_size=4, seed=False)])
    assert (res.reason, res.steps, res.tries, res.final) == ("failures", max_failures, 4 * max_failures, initial)


def test_greedy_search_stops_after_max_steps(records):
    env = env_from_record(records["islands"][0])
    # failures unlimited, one check per step: only the step limit max(150, 5 * 40) = 200 stops it
    [res] = drive([greedy_search(env, history=History(), initial_crossings=40, rng=np.random.default_rng(1),
                                 guide="random", step_size=1, max_failures=math.inf, seed=False)])
    assert (res.reason, res.steps, res.tries) == ("steps", 200, 200)


def test_model_search_stops_when_every_ranked_op_was_checked(records, model):
    env = recording(env_from_record(records["left_right"][0]))
    score = model_scorer(model)
    [res] = drive([greedy_search(env, history=History(), initial_crossings=env.crossings, seed=False,
                                 rng=np.random.default_rng(0), max_failures=math.inf, max_steps=math.inf)], score)
    # no op improves the zigzag: every ranked (legal anchor, top-3 action) op is checked exactly once
    ranked = model_ranking(score([ScoreRequest(env, History(), env.crossings)])[0], legal_anchors(env))
    assert res.reason == "exhausted" and res.ops == []
    assert res.tries == len(ranked.ops) == len({c[0] for c in env.checks}) > 0


def test_history_seeding_keeps_exactly_the_improving_checks(starts):
    kept_total = 0
    for i, s in enumerate(starts["islands"][:6] + starts["voronoi"][:6]):
        env, history = recording(s.env()), History()
        res = seed_history(env, history, np.random.default_rng(i), tries=50, keep=5)
        improving = [op for op, r, _ in env.checks if r.ok and r.delta < 0]
        assert res.tries == len(env.checks) <= 50
        assert res.ops == improving[:5] == [a[0] for a in env.applied]
        assert len(res.ops) <= 5 and (len(res.ops) == 5 or res.tries == 50)
        assert list(history.entries) == [(op.variant, op.y, op.x, b, a) for op, b, a in env.applied]
        assert all(a < b for _, b, a in env.applied)
        assert_valid_path(env)
        kept_total += len(res.ops)
    assert kept_total > 0


def test_history_seeding_on_a_local_minimum_changes_nothing(records):
    env = env_from_record(records["stripes"][0])
    H0, history = env.H.copy(), History()
    res = seed_history(env, history, np.random.default_rng(0))
    assert res.ops == [] and res.tries == 50 and len(history) == 0
    np.testing.assert_array_equal(env.H, H0)


def test_random_baseline_gets_exactly_the_model_search_budget(starts, model):
    items = _greedy_setting([s for p in PATTERNS for s in starts[p][:2]], model_scorer(model), seed=0)
    for it in items:
        m, r = it["model"], it["random"]
        assert r["tries"] == m["tries"] or (r["reason"] == "exhausted" and r["tries"] < m["tries"])
        assert r["reason"] in ("budget", "exhausted") and r["seeded"] == 0
    assert sum(it["random"]["reason"] == "budget" for it in items) > 0


def oracle_scorer(requests):
    # a "model" that knows the best op: all position mass on its anchor, its variant first there
    out = []
    for req in requests:
        h, w = req.env.zones.shape
        cand = req.env.candidates()
        j = int(np.argmin(cand.delta))
        position, action = np.full((4, h, w), 1e-3, np.float32), np.full((12, h, w), 1e-3, np.float32)
        position[:, cand.y[j], cand.x[j]] = 1.0
        action[cand.variant[j], cand.y[j], cand.x[j]] = 1.0
        out.append(Scores(position, action))
    return out


def test_a_ranking_that_knows_the_best_op_improves_at_the_first_try(starts):
    # the search follows the ranking: a perfect scorer needs one try per improvement, random more
    chosen = [s for p in PATTERNS for s in starts[p][:3]]
    model = drive([greedy_search(s.env(), history=s.history.copy(), initial_crossings=s.record["initial_crossings"],
                                 rng=np.random.default_rng(0), explore_prob=0.0, max_tries=3, seed=False)
                   for s in chosen], oracle_scorer)
    for s, r in zip(chosen, model):
        env, best_first = s.env(), []  # brute-force greedy, at most 3 ops
        while len(best_first) < 3 and env.candidates().delta.min() < 0:
            cand = env.candidates()
            best_first.append(cand.op(int(np.argmin(cand.delta))))
            env.apply(best_first[-1])
        assert r.first_improvement == 1 and r.ops == best_first and r.tries == 3
    random = drive([greedy_search(s.env(), history=s.history.copy(), initial_crossings=s.record["initial_crossings"],
                                  rng=np.random.default_rng(0), guide="random", seed=False) for s in chosen])
    assert np.mean([r.first_improvement for r in random]) > 5


def test_model_ranking_tier0_is_the_per_hypothesis_top_k_union():
    rng = np.random.default_rng(0)
    k, h, w, top = 3, 7, 9, 4
    legal = rng.random((h, w)) < 0.7
    position = rng.random((k, h, w)).astype(np.float32) * legal
    action = rng.random((12, h, w)).astype(np.float32)
    ranked = model_ranking(Scores(position, action), legal, top_k_per_hyp=top, top_k_act=3)
    # reference: each hypothesis' top-`top` legal anchors, merged, sorted by the best probability
    union = set()
    for p in position:
        cells = sorted(zip(*np.nonzero(legal)), key=lambda c: -p[c])[:top]
        union |= {tuple(map(int, c)) for c in cells}
    # ... each with its 3 most probable actions, kept when the window fits in the grid
    expected = {(int(v), y, x) for y, x in union for v in np.argsort(-action[:, y, x])[:3]
                if y <= h - OPS[v].height and x <= w - OPS[v].width}
    tier0 = ranked.ops[ranked.tier == 0]
    assert {tuple(map(int, op)) for op in tier0} == expected and len(tier0) == len(expected)
    seen = list(dict.fromkeys((int(y), int(x)) for _, y, x in tier0))
    best = [position[:, y, x].max() for y, x in seen]
    assert best == sorted(best, reverse=True)
    assert (np.diff(ranked.tier) >= 0).all()
    assert legal[ranked.ops[:, 1], ranked.ops[:, 2]].all()
    assert len({tuple(op) for op in ranked.ops.tolist()}) == len(ranked.ops)  # every op once


def test_model_scorer_batches_by_shape_like_one_by_one(records, model):
    envs = [env_from_record(records["voronoi"][0]), env_from_record(run_teacher(10, 13, "islands", 0, iters=50)),
            env_from_record(records["islands"][1])]
    reqs = [ScoreRequest(e, History([(1, 2, 3, 10, 9)] * i), 20 + i) for i, e in enumerate(envs)]
    assert History.from_array(reqs[2].history.array(), 2).entries == reqs[2].history.entries
    score = model_scorer(model)
    together = score(reqs)
    for req, s in zip(reqs, together):
        [alone] = score([req])
        np.testing.assert_allclose(s.position, alone.position, atol=1e-5)
        masked = legal_anchor_mask(torch.from_numpy(state_channels(req.env.zones, req.env.H, req.env.V)[None]))[0]
        assert (s.position[:, masked.numpy()] == 0).all()
        np.testing.assert_allclose(s.position.sum((1, 2)), 1.0, atol=1e-5)
        np.testing.assert_allclose(s.action.sum(0), 1.0, atol=1e-5)


def test_uniform_annealing_is_the_teacher(records):
    rec = run_teacher(12, 12, "voronoi", seed=5, iters=700)
    rng = np.random.default_rng(np.random.SeedSequence(5).spawn(2)[1])  # the teacher's annealing stream
    [res] = drive([anneal(env_from_record(rec), iters=700, t_max=rec["t_max"], t_min=rec["t_min"], rng=rng,
                          target=rec["final_crossings"])])
    assert [op.to_record() for op in res.ops[: rec["sequence_len"]]] == rec["sequence_ops"]
    assert res.best == rec["final_crossings"] and len(res.ops) == rec["n_accepted"]
    assert res.reached_at == res.best_at


@pytest.mark.parametrize("guide", ["uniform", "model"])
def test_annealing_at_zero_temperature_never_accepts_uphill(starts, model, guide):
    def run(t, seed):
        s = starts["islands"][0]
        env = recording(s.env(), require_check=False)
        [res] = drive([anneal(env, iters=300, t_max=t, t_min=t, rng=np.random.default_rng(seed), guide=guide,
                              history=s.history.copy(), model_every=20)], model_scorer(model))
        assert_valid_path(env)
        assert [a[0] for a in env.applied] == res.ops and res.final == env.crossings
        return [a - b for _, b, a in env.applied]

    for seed in range(3):
        assert all(d <= 0 for d in run(1e-12, seed))
        assert all(d <= 0 for d in run(0.0, seed))
    assert any(d > 0 for seed in range(3) for d in run(5.0, seed))  # hot: uphill moves are accepted


def test_model_annealing_only_applies_pool_ops_and_logs_improvements(records, model):
    rec = records["stripes"][1]
    env = recording(env_from_record(rec), require_check=False)
    history = History()
    [res] = drive([anneal(env, iters=400, t_max=rec["t_max"], t_min=rec["t_min"], rng=np.random.default_rng(0),
                          guide="model", history=history, model_every=25)], model_scorer(model))
    assert_valid_path(env)
    assert res.best <= res.initial and len(res.ops) == len(env.applied) > 0
    improving = [(op.variant, op.y, op.x, b, a) for op, b, a in env.applied if a < b]
    assert list(history.entries) == improving[-32:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, records):
    # the dataset contract's two files inference reads (build_data.py writes them with the stores)
    out = tmp_path_factory.mktemp("fusion_data")
    recs = [r for p in PATTERNS for r in records[p]]
    extra = run_teacher(12, 12, "voronoi", seed=9, iters=300, run_id="train_only")
    return write_split_records(out, test=recs, train=[extra])


def test_load_split_records_reads_only_its_split(data_dir, tmp_path):
    recs = load_split_records(data_dir)
    assert len(recs) == 12 and "train_only" not in {r["run_id"] for r in recs}
    assert [r["run_id"] for r in load_split_records(data_dir, "train")] == ["train_only"]
    with pytest.raises(ValueError, match="no val run ids"):
        load_split_records(data_dir, "val")
    with pytest.raises(ValueError, match="split: expected one of"):
        load_split_records(data_dir, "valid")
    (tmp_path / "trajectories.jsonl").write_text("")
    (tmp_path / "splits.json").write_text(json.dumps({"test": ["gone"]}))
    with pytest.raises(ValueError, match="test run ids"):
        load_split_records(tmp_path)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    from fusion.build_data import build_dataset  # the dataset builder's smoke build (a few seconds)

    out = tmp_path_factory.mktemp("fusion_smoke")
    build_dataset(out, smoke=True, workers=1)
    return out


def test_run_evaluation_returns_the_documented_structure(smoke_data, model):
    results = run_evaluation(model, smoke_data, n_per_pattern=2, seed=0, smoke=True)
    json.dumps(results, allow_nan=False)
    assert results["n_test_trajectories"] == len(json.loads((smoke_data / "splits.json").read_text())["test"])
    assert results["overall"] == results["setting1"]["overall"]
    for setting, other in (("setting1", "random"), ("setting2", "uniform"), ("setting3", "random")):
        rows = results[setting]
        assert list(rows) == [*PATTERNS, "overall"]
        assert rows["overall"]["n"] == sum(rows[p]["n"] for p in PATTERNS)
        for row in rows.values():
            for name in ("model", other) + (("uniform_time",) if setting == "setting2" else ()):
                assert row[f"{name}_mean_reduction"] >= 0
                assert 0 <= row[f"{name}_improved_fraction"] <= 1
                assert 0 <= row[f"{name}_gap_closed"] <= 1  # searches keep their best: never above the start
            assert 0 < row["teacher_gap_closed"] <= 1 and row["bound"] >= 1
    for p in PATTERNS:
        assert results["setting1"][p]["n"] == 2 and results["setting2"][p]["n"] == 1
        assert results["setting1"][p]["model_mean_tries"] == results["setting1"][p]["random_mean_tries"] or \
            results["setting1"][p]["random_mean_tries"] < results["setting1"][p]["model_mean_tries"]
        assert results["setting2"][p]["budget"] == 150
        test_of_pattern = sum(r["zone_pattern"] == p for r in load_split_records(smoke_data))
        assert results["setting3"][p]["n"] == min(2, test_of_pattern) and results["setting3"][p]["n"] >= 1
        assert results["setting3"][p]["teacher_mean_reduction"] > 0
        assert results["setting1"][p]["oracle_mean_reduction"] >= 1  # the start has an improving op
    assert model.training is False
    table = format_table(results)
    assert "Setting 1" in table and "Setting 2" in table and "Setting 3: the seed's inference protocol" in table
    for name in (*PATTERNS, "overall"):
        assert sum(line.startswith(name) for line in table.splitlines()) == 3
    # same seed, same table, except the wall-time measurements (and the equal-time budget they set)
    fixed = run_evaluation(model, smoke_data, n_per_pattern=2, seed=0, smoke=True, time_ratio=1.5)
    again = run_evaluation(model, smoke_data, n_per_pattern=2, seed=0, smoke=True, time_ratio=1.5)

    def untimed(res):
        return {k: ({s: {c: v for c, v in row.items() if not c.endswith("_seconds")} for s, row in v.items()}
                    if k == "setting2" else v) for k, v in res.items() if k != "runtime_s"}

    assert untimed(again) == untimed(fixed)
    assert {k: v for k, v in fixed.items() if k != "setting2" and k != "runtime_s"} == \
        {k: v for k, v in results.items() if k != "setting2" and k != "runtime_s"}
    for p in PATTERNS:
        assert fixed["setting2"][p]["uniform_time_budget"] == 225 and fixed["setting2"][p]["time_ratio"] == 1.5


def test_setting3_runs_the_seeds_protocol_from_the_initial_paths(records, model, monkeypatch):
    """History seeding, K x 8 candidates, exploration 0.15 and the adaptive give-up (greedy_search's defaults, the
    seed's) from each record's initial path, and the random order at exactly the model search's op checks."""
    calls = []

    def spy(env, **kwargs):
        calls.append((env.crossings, kwargs))
        return greedy_search(env, **kwargs)

    monkeypatch.setattr(infer, "greedy_search", spy)
    recs = [records[p][0] for p in PATTERNS]
    items = _seed_protocol_setting(recs, model_scorer(model), seed=0)
    model_calls, random_calls = calls[:len(recs)], calls[len(recs):]
    for rec, (start, kwargs) in zip(recs, model_calls):
        assert start == rec["initial_crossings"] and kwargs["guide"] == "model" and len(kwargs["history"]) == 0
        assert set(kwargs) == {"env", "history", "initial_crossings", "rng", "guide"} - {"env"}  # seed's defaults
        assert kwargs["initial_crossings"] == rec["initial_crossings"]
    for item, (_, kwargs) in zip(items, random_calls):
        assert kwargs["guide"] == "random" and kwargs["max_tries"] == item["model"]["tries"] == item["random"]["tries"]
    for rec, item in zip(recs, items):
        assert item["model"]["initial"] == rec["initial_crossings"] and item["teacher_final"] == rec["final_crossings"]
        # these four zigzag starts admit no improving single op (a mid-trajectory start would): nothing is seeded
        assert item["model"]["final"] == item["model"]["initial"] and item["model"]["seeded"] == 0
        assert item["model"]["tries"] >= 50 and item["model"]["reason"] in ("failures", "exhausted")


def test_setting3_row_is_the_seeds_table():
    def item(pattern, initial, final_model, final_random, teacher_initial, teacher_final, bound):
        return {"pattern": pattern, "initial": initial, "teacher_initial": teacher_initial, "bound": bound,
                "teacher_final": teacher_final, "model": {"initial": initial, "final": final_model, "tries": 10,
                                                          "seeded": 1},
                "random": {"initial": initial, "final": final_random, "tries": 10, "seeded": 0}}

    row = seed_protocol_row([item("v", 20, 15, 20, 20, 16, 2), item("v", 10, 10, 9, 12, 10, 4)])
    assert row["model_mean_reduction"] == 2.5 and row["model_mean_reduction_pct"] == pytest.approx(12.5)
    assert row["random_mean_reduction"] == 0.5 and row["random_mean_reduction_pct"] == pytest.approx(5.0)
    assert row["teacher_mean_reduction"] == 3.0
    assert row["teacher_mean_reduction_pct"] == pytest.approx((20 + 50 / 3) / 2)
    assert row["model_reached_teacher_fraction"] == 1.0 and row["random_reached_teacher_fraction"] == 0.5
    assert row["model_improved_fraction"] == 0.5 and row["random_improved_fraction"] == 0.5
    # the gap to the region bound: the searches from the initial path, the teacher from its recorded start
    assert row["bound"] == 3.0 and row["model_gap_closed"] == pytest.approx(5 / 24)
    assert row["random_gap_closed"] == pytest.approx(1 / 24) and row["teacher_gap_closed"] == pytest.approx(6 / 26)


def test_setting1_row_reports_the_gap_closed_from_the_start_state():
    def item(start, bound, model, random, oracle, teacher_rest):
        run = {"tries": 5, "first_improvement": 1, "seeded": 0}
        return {"pattern": "v", "start": start, "bound": bound, "model": {**run, "initial": start, "final": model},
                "random": {**run, "initial": start, "final": random}, "oracle": oracle, "teacher_rest": teacher_rest}

    row = greedy_row([item(12, 2, 9, 12, 4, 6), item(8, 4, 7, 6, 2, 3)])
    assert row["bound"] == 3.0
    assert row["model_gap_closed"] == pytest.approx((3 + 1) / (10 + 4))
    assert row["random_gap_closed"] == pytest.approx((0 + 2) / 14)
    assert row["oracle_gap_closed"] == pytest.approx((4 + 2) / 14)
    assert row["teacher_gap_closed"] == pytest.approx((6 + 3) / 14)


def test_run_evaluation_runs_only_the_settings_asked_for(smoke_data, model):
    results = run_evaluation(model, smoke_data, n_per_pattern=2, seed=0, smoke=True, settings=(2,), time_ratio=1.0)
    assert "setting2" in results and "setting1" not in results and "setting3" not in results
    assert results["overall"] is None and results["guide"] == infer.AnnealGuide()._asdict()
    table = format_table(results)
    assert "Setting 2" in table and "Setting 1" not in table and "Setting 3" not in table
    with pytest.raises(ValueError, match="settings"):
        run_evaluation(model, smoke_data, n_per_pattern=2, seed=0, smoke=True, settings=(4,))


def test_setting2_scores_the_model_on_one_thread_and_restores_the_threads(data_dir, model):
    # CPU seconds count every thread of the process: the equal-time budget would bill idle intra-op threads
    inner, seen = model_scorer(model), []

    def score(requests):
        seen.append(torch.get_num_threads())
        return inner(requests)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = infer._anneal_setting(load_split_records(data_dir)[:2], score, 0, 150,
                                     infer.AnnealGuide(model_start=0.0), time_ratio=1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(rows) == 2 and seen and set(seen) == {1}
