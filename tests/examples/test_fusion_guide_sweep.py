"""guide_sweep.py replays setting 2 with its default guide, and picks the guide that wins the most patterns."""
from __future__ import annotations

import json

import pytest
import torch
from fusion import guide_sweep, infer
from fusion.model import FusionNet
from fusion.teacher import run_teacher
from fusion_datasets import write_split_records

PATTERNS = ("islands", "left_right", "stripes", "voronoi")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_guides")
    recs = [run_teacher(10, 10, p, seed=s, iters=300) for p in PATTERNS for s in range(3)]
    val = [run_teacher(10, 10, p, seed=10 + s, iters=300) for p in PATTERNS for s in range(2)]
    return write_split_records(out, test=recs, val=val)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FusionNet(widths=(8, 16, 16, 16), rnn_hidden=16).eval()


def test_the_default_guide_on_the_test_split_replays_setting_2(data_dir, net):
    seed = 1
    table = infer.run_evaluation(net, data_dir, n_per_pattern=4, seed=seed, settings=(2,))["setting2"]
    result = guide_sweep.sweep(infer.load_split_records(data_dir), [(seed, infer.model_scorer(net, max_batch=32))],
                               {"default": infer.AnnealGuide()}, per_pattern=2)
    for name, column in (("uniform", "uniform"), ("default", "model")):
        [got] = result[name]
        assert set(got) == {*PATTERNS, "overall"}
        for pattern, row in table.items():
            assert got[pattern] == pytest.approx(row[f"{column}_gap_closed"], abs=1e-12), (name, pattern)


def test_repeats_add_streams_and_every_guide_meets_the_same_uniform_runs(data_dir, net):
    guides = {"a": infer.AnnealGuide(), "b": infer.AnnealGuide(model_temperature=1.0)}
    score = infer.model_scorer(net)
    records = infer.load_split_records(data_dir, "val")
    one = guide_sweep.sweep(records, [(0, score)], guides, per_pattern=5, repeats=1)
    two = guide_sweep.sweep(records, [(0, score)], guides, per_pattern=5, repeats=2)
    assert len(two["uniform"]) == len(two["a"]) == 2 and two["uniform"][0] == one["uniform"][0]
    assert two["a"][0] == one["a"][0]
    assert two["uniform"][1] != two["uniform"][0]  # another stream, another run
    assert set(two["seconds"]) == {"uniform", "a", "b"} and min(two["seconds"].values()) > 0
    both = guide_sweep.combine([one, json.loads(json.dumps(two))])  # as read back from --json files
    assert both["a"] == one["a"] + two["a"] and both["seconds"]["b"] == one["seconds"]["b"] + two["seconds"]["b"]
    with pytest.raises(ValueError, match="the same guides"):
        guide_sweep.combine([one, {k: v for k, v in two.items() if k != "b"}])
    text = guide_sweep.format_table(two, guides)
    assert text.splitlines()[0].startswith("| guide | islands (points) |") and len(text.splitlines()) == 5


def _gaps(model: list[float], overall: float) -> dict[str, float]:
    return {**dict(zip(PATTERNS, model)), "overall": overall}


def test_choose_prefers_patterns_won_then_the_overall_gap():
    uniform = [_gaps([0.5, 0.5, 0.5, 0.5], 0.5)] * 3
    result = {
        "uniform": uniform,
        "broad": [_gaps([0.51, 0.51, 0.51, 0.51], 0.51)] * 3,  # wins 4 patterns, overall 51%
        "peaky": [_gaps([0.9, 0.9, 0.9, 0.4], 0.8)] * 3,  # wins 3, overall 80%
        "loses": [_gaps([0.4, 0.4, 0.4, 0.4], 0.4)] * 3,
        "seconds": {"uniform": 1.0, "broad": 2.0, "peaky": 2.0, "loses": 2.0},
    }
    guides = {n: infer.AnnealGuide() for n in ("peaky", "broad", "loses")}
    assert guide_sweep.choose(result, guides) == "broad"
    result["broad"] = [_gaps([0.51, 0.51, 0.51, 0.49], 0.51)] * 3  # now 3 each: the overall decides
    assert guide_sweep.choose(result, guides) == "peaky"
    text = guide_sweep.format_table(result, guides)
    assert "| peaky | +40.0 [+40.0, +40.0] | +40.0 [+40.0, +40.0] | +40.0 [+40.0, +40.0] | -10.0 [-10.0, -10.0] " \
           "| 3/4 | 80.0% | 2.00 |" in text


def test_arguments_and_the_checkpoint_seed(tmp_path):
    args = guide_sweep.parse_args(["--data", "d", "--checkpoints", "a,b", "--temperatures", "1,4", "--explore",
                                   "0.5,0.75"])
    assert len(args.guides) == 4 and args.split == "val"
    assert args.guides["explore 0.75, T 4, start 0.5"] == infer.AnnealGuide(explore_prob=0.75, model_temperature=4.0)
    assert guide_sweep.parse_args(["--data", "d", "--combine", "a.json"]).combine == "a.json"
    for bad in (["--temperatures", "x"], ["--per-pattern", "0"], ["--temperatures", ""], ["--checkpoints", ""]):
        with pytest.raises(SystemExit):
            guide_sweep.parse_args(["--data", "d", "--checkpoints", "a", *bad] if bad[0] != "--checkpoints"
                                   else ["--data", "d", *bad])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert guide_sweep.checkpoint_seed(run / "checkpoints", 7) == 7
    (run / "run.json").write_text(json.dumps({"config": {"seed": 3}}))
    assert guide_sweep.checkpoint_seed(run / "checkpoints", 7) == 3
