"""search_budget.py replays setting 2's annealing exactly at the setting's budget, then stretches it."""
from __future__ import annotations

import pytest
import torch
from fusion import infer, search_budget
from fusion.model import FusionNet
from fusion.teacher import run_teacher
from fusion_datasets import write_split_records

PATTERNS = ("islands", "left_right", "stripes", "voronoi")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_budget")
    recs = [run_teacher(10, 10, p, seed=s, iters=400) for p in PATTERNS for s in range(3)]
    return write_split_records(out, test=recs)


def test_the_setting_budget_replays_setting_2(data_dir):
    torch.manual_seed(0)
    net = FusionNet(widths=(8, 16, 16, 16), rnn_hidden=16)
    for seed in (1,):
        table = infer.run_evaluation(net, data_dir, n_per_pattern=4, seed=seed, settings=(2,))["setting2"]
        result = search_budget.measure(infer.load_split_records(data_dir), [400], [seed], per_pattern=2, workers=1)
        for guide in ("uniform", "oracle"):
            got = result["gap_closed"][guide][400][seed]
            assert set(got) == {*PATTERNS, "overall"}
            for pattern, row in table.items():
                assert got[pattern] == pytest.approx(row[f"{guide}_gap_closed"], abs=1e-12), (guide, seed, pattern)


def test_table_and_arguments(data_dir):
    result = search_budget.measure(infer.load_split_records(data_dir), [50, 400], [0, 1], per_pattern=1, workers=1)
    text = search_budget.format_table(result, [50, 400], [0, 1])
    assert text.splitlines()[0] == "| guide | proposals | islands | left_right | stripes | voronoi | overall |"
    assert len(text.splitlines()) == 2 + 2 * 2 and "| oracle | 400 |" in text
    for bad in (["--budgets", "0"], ["--seeds", "x"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            search_budget.parse_args(["--data", str(data_dir), *bad])


def test_oracle_ils_descends_by_improving_ops_and_never_passes_the_bound(data_dir):
    import numpy as np
    from fusion.teacher import env_from_record

    records = infer.load_split_records(data_dir)
    start = next(s for rec in records for s in infer.mid_trajectory_starts(rec))  # an improving op exists
    env = start.env()
    best_delta = int(env.candidates().delta.min())
    assert best_delta < 0
    one = search_budget.oracle_ils(env.copy(), 1, np.random.default_rng(0))
    assert start.crossings + best_delta <= one < start.crossings  # one proposal: one improving op
    for rec in records[:6]:
        runs = [search_budget.oracle_ils(env_from_record(rec), 400, np.random.default_rng(k)) for k in (1, 1, 2)]
        assert runs[0] == runs[1]  # a function of the random stream
        assert all(infer.record_bound(rec) <= r <= rec["initial_crossings"] for r in runs)
    zero = search_budget.oracle_ils(env_from_record(records[0]), 0, np.random.default_rng(0))
    assert zero == records[0]["initial_crossings"]
