"""m-height example: the MoE families (FCN or ResNet experts; hard, soft or top-k gate; learned temperature), the FCN
knobs, the input scaling and the FCN study, as models and as flags of the script under --smoke."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mheight.heights import NK
from mheight.models import MoE, build_model, encode
from mheight.study import GridPoint, grid, ints, study_table
from test_mheight_moe import SCRIPT, TIMEOUT, assert_learned, batch
from torch import nn
from torchrun_helpers import read_metrics, run_example


def every_shape(rows_per_shape=2, seed=0, scaling="standard"):
    """Features of rows of every code shape (n, k) in NK, m = 2, in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    side = torch.tensor([[n, k, 2] for n, k in NK for _ in range(rows_per_shape)], dtype=torch.float32)
    side = side[torch.randperm(len(side), generator=g)]
    matrix = torch.zeros(len(side), 6, 6)
    for i, (n, k, _) in enumerate(side.long().tolist()):
        matrix[i, :k, : n - k] = torch.rand(k, n - k, generator=g) * 200 - 100
    return encode(matrix, side, scaling)


def expert_outputs(moe: MoE, x, side) -> torch.Tensor:
    """Every expert on every row, ``(B, E)``: the mixture's reference, without its dispatch."""
    return torch.cat([e(x, side) for e in moe.moe.experts], dim=1)


@pytest.mark.parametrize("experts", ["fcn", "resnet"])
def test_hard_gate_sends_each_code_shape_to_its_own_expert(experts, one_thread):
    torch.manual_seed(0)
    moe = build_model("moe", 8, 1, fcn_widths=(16,), experts=experts, gate="hard").eval()
    x, side, key = every_shape()
    weights = moe.route(side, key)
    assert torch.equal(weights, nn.functional.one_hot(key, len(NK)).float())
    raw = every_shape(scaling="none").side  # the same rows, (n, k, m) as is
    assert key.tolist() == [NK.index((n, k)) for n, k in raw[:, :2].long().tolist()]
    expected = expert_outputs(moe, x, side).gather(1, key[:, None]).squeeze(1)
    torch.testing.assert_close(moe(x, side, key).value, expected)
    with pytest.raises(ValueError, match="key: KeyGate routes by an integer key"):
        moe(x, side)  # the hard gate cannot guess the shape from a centred side


def test_soft_gate_blends_every_expert_by_a_softmax_of_n_and_k(one_thread):
    torch.manual_seed(0)
    moe = build_model("moe", fcn_widths=(16,), fcn_dropout=0.0, experts="fcn", gate="soft").eval()
    x, side, key = every_shape()
    weights = moe.route(side, key)
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(1), torch.ones(len(side)))
    torch.testing.assert_close(weights, moe.moe.gate.router(side[:, :2]).softmax(-1))  # (n, k) only, not m
    torch.testing.assert_close(moe(x, side, key).value, (weights * expert_outputs(moe, x, side)).sum(1))


def test_soft_fcn_moe_from_a_trained_fcn_starts_as_that_fcn(one_thread):
    """Attempt 7's recipe: every expert a copy of the best FCN, then fine-tuned together; in eval mode (no
    dropout) the blend of six equal experts is the FCN itself, and the copies are independent."""
    torch.manual_seed(0)
    fcn = build_model("fcn", fcn_widths=(32, 16), fcn_dropout=0.3).eval()
    moe = MoE.from_backbone(fcn.net, gate="soft").eval()
    features = every_shape()
    torch.testing.assert_close(moe(*features).value, fcn(*features).value, rtol=1e-5, atol=1e-5)
    first, second = (e.mlp.out.weight for e in moe.moe.experts[:2])
    assert first.data_ptr() != second.data_ptr()


def test_fcn_widths_and_dropout_reach_the_network():
    net = build_model("fcn", fcn_widths=(64, 32), fcn_dropout=0.1).net.mlp
    assert net.widths == [64, 32] and net.in_dim == 2 * 36 + 3
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    assert not any(isinstance(m, nn.Dropout) for m in build_model("fcn", fcn_dropout=0.0).modules())


@pytest.mark.parametrize("k", [1, 2])
def test_topk_gate_selects_k_experts_and_its_learned_temperature_gets_a_gradient(k, one_thread):
    torch.manual_seed(0)
    moe = build_model("moe", 8, 1, gate="topk", k=k, learn_temperature=True)
    x, side, key = every_shape()
    weights = moe.route(side, key)
    assert torch.all((weights > 0).sum(1) == k)
    log_t = moe.moe.gate.log_temperature
    assert float(log_t.detach()) == 0.0  # T = 1 at init
    moe(x, side, key).value.square().mean().backward()
    assert log_t.grad is not None and float(log_t.grad.abs()) > 0
    with torch.no_grad():
        log_t.fill_(math.log(4.0))  # T = 4: the selected logits are divided by 4
        logits = moe.moe.gate.router(side[:, :2])
        top, idx = logits.topk(k, dim=-1)
        expected = torch.zeros_like(logits).scatter(1, idx, (top / 4).softmax(-1) if k > 1 else torch.ones_like(top))
    torch.testing.assert_close(moe.route(side, key), expected)
    assert build_model("moe", 8, 1).moe.gate.log_temperature is None  # off by default, as in the seed


def test_only_the_topk_gate_has_a_temperature():
    with pytest.raises(ValueError, match="learn_temperature: only the 'topk' gate"):
        build_model("moe", 8, 1, gate="soft", learn_temperature=True)
    with pytest.raises(ValueError, match="gate: expected one of"):
        build_model("moe", 8, 1, gate="dense")


def test_input_scaling_none_feeds_p_log_p_and_the_side_raw():
    features = batch(5)
    raw = encode(features.x[:, 0] * 100.0, features.side * torch.tensor([0.5, 1.0, 2.0]) + torch.tensor(
        [9.5, 5.0, 4.0]), "none")
    torch.testing.assert_close(raw.x[:, 0], features.x[:, 0] * 100.0)
    torch.testing.assert_close(raw.x[:, 1], features.x[:, 1] * 7.0)  # log2|P| unscaled
    assert raw.side[:, :2].tolist() == [[9, 4], [10, 6], [9, 5], [10, 4], [9, 6]]
    assert torch.equal(raw.key, features.key)
    with pytest.raises(ValueError, match="scaling: expected one of"):
        encode(features.x[:, 0], raw.side, "minmax")


def test_study_grid_is_the_cartesian_product_and_rejects_bad_values():
    points = grid("128,64,32;512,256,128", "0,0.3", "5e-4,1e-3")
    assert len(points) == 8 and len({p.name for p in points}) == 8
    assert GridPoint((512, 256, 128), 0.3, 5e-4) in points
    assert points[0].name == "w128-64-32_d0_lr0.0005"
    assert ints("512, 256") == (512, 256)
    for bad, match in ((("0,5", "0", "1e-3"), "widths: expected"), (("8", "1.0", "1e-3"), "--grid-dropout"),
                       (("8", "0", "x"), "--grid-lr"), (("8", "0,0", "1e-3"), "repeated grid point")):
        with pytest.raises(ValueError, match=match):
            grid(*bad)


def test_study_table_lists_points_best_first_under_the_baseline():
    def row(widths, val):
        return {"widths": widths, "dropout": 0.3, "lr": 1e-3, "parameters": 10, "best_epoch": 2,
                "val": {"overall": val}, "test": {"overall": val + 0.1}, "train_time_s": 1.0}

    table = study_table([row((8,), 1.5), row((16, 8), 1.2)], {"val": {"overall": 1.4}, "test": {"overall": 1.45}})
    lines = table.splitlines()
    assert lines[3].startswith("16,8") and lines[4].startswith("8 ")
    assert lines[-1].split()[-2:] == ["1.4000", "1.4500"]


# --- the flags under --smoke, end to end (2 processes) ----------------------------------------------------------

def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_soft_fcn_moe_from_the_trained_fcn_with_the_fcn_knobs(tmp_path):
    """--epochs 6 for the FCN: trained, FCN and MoE score 0.51-0.73x the constant predictor over seeds 0-2."""
    out = tmp_path / "run"
    proc = run_example(SCRIPT, out, "--models", "fcn,moe", "--experts", "fcn", "--gate", "soft", "--fcn-widths",
                       "128,64", "--fcn-dropout", "0.1", "--epochs", "6", timeout=TIMEOUT)
    results = summary(out)["results"]
    assert results["fcn"]["parameters"] == (75 * 128 + 128) + (128 * 64 + 64) + (64 + 1)
    moe = results["moe"]
    assert moe["parameters"] == 6 * results["fcn"]["parameters"] + (2 * 16 + 16) + (16 * 6 + 6)
    assert (moe["experts"], moe["gate"], moe["initialised_from"]) == ("fcn", "soft", "fcn")
    assert "every expert a copy of the trained fcn" in proc.stdout
    for weights in moe["routing_val"].values():
        assert min(weights) > 0 and sum(weights) == pytest.approx(1, abs=1e-3)
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["fcn_widths"], config["fcn_dropout"]) == ([128, 64], 0.1)
    assert [r["opt_step"] for r in read_metrics(out / "moe" / "metrics.jsonl")] == [10, 20]  # --moe-epochs
    assert_learned(out, out / "data", ["fcn", "moe"])


@pytest.mark.slow
@pytest.mark.distributed
def test_raw_inputs_train_a_different_resnet_that_learns(tmp_path):
    """--input-scaling none: trained, 0.40-0.82x the constant predictor over seeds 0-2 (BatchNorm absorbs the scale);
    its predictions differ from the standard-scaled run's on the same data and seed."""
    raw, standard = tmp_path / "raw", tmp_path / "standard"
    run_example(SCRIPT, raw, "--models", "resnet", "--input-scaling", "none", timeout=TIMEOUT)
    run_example(SCRIPT, standard, "--models", "resnet", "--data", str(raw / "data"), timeout=TIMEOUT)
    assert json.loads((raw / "run.json").read_text())["config"]["input_scaling"] == "none"
    assert_learned(raw, raw / "data", ["resnet"])
    val = [summary(out)["results"]["resnet"]["val"]["overall"] for out in (raw, standard)]
    assert val[0] != val[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_hard_fcn_moe_from_scratch_routes_by_shape_and_learns(tmp_path):
    out = tmp_path / "run"
    # 6 epochs: each expert sees a sixth of the rows. Trained: 0.44-0.55x the constant predictor over seeds 0-2; with
    # --lr 0 (no step), 0.99-1.02x
    run_example(SCRIPT, out, "--models", "moe", "--experts", "fcn", "--gate", "hard", "--epochs", "6", timeout=TIMEOUT)
    moe = summary(out)["results"]["moe"]
    assert (moe["experts"], moe["gate"], moe["initialised_from"]) == ("fcn", "hard", None)
    assert moe["routing_val"] == {str(nk): [float(i == j) for j in range(6)] for i, nk in enumerate(NK)}
    assert_learned(out, out / "data", ["moe"])


@pytest.mark.slow
@pytest.mark.distributed
def test_top1_resnet_moe_learns_its_gate_temperature(tmp_path):
    out = tmp_path / "run"
    run_example(SCRIPT, out, "--top-k", "1", "--learn-temperature", "1", timeout=TIMEOUT)
    moe = summary(out)["results"]["moe"]
    assert (moe["gate"], moe["top_k"], moe["initialised_from"]) == ("topk", 1, "resnet")
    for weights in moe["routing_val"].values():  # one code shape, one gate input: one expert
        assert sorted(weights) == [0.0] * 5 + [1.0]
    assert abs(moe["temperature"] - 1.0) > 1e-4  # learned: T = 1 at init (0.9970-0.9973 after 20 steps, seeds 0-2)
    assert_learned(out, out / "data", ["resnet", "moe"])


@pytest.mark.slow
@pytest.mark.distributed
def test_study_trains_one_fcn_per_grid_point_and_prints_the_table(tmp_path):
    out = tmp_path / "run"
    proc = run_example(SCRIPT, out, "--study", "fcn", "--grid-widths", "32;64,32", "--grid-dropout", "0,0.3",
                       "--grid-lr", "1e-3", timeout=TIMEOUT)
    study = summary(out)["study"]
    assert sorted((tuple(r["widths"]), r["dropout"]) for r in study) == [((32,), 0.0), ((32,), 0.3),
                                                                         ((64, 32), 0.0), ((64, 32), 0.3)]
    for r in study:
        point = GridPoint(tuple(r["widths"]), r["dropout"], r["lr"])
        assert len(read_metrics(out / "study" / point.name / "metrics.jsonl")) == 2
    assert {r["parameters"] for r in study} == {75 * 32 + 32 + 33, 75 * 64 + 64 + 64 * 32 + 32 + 33}
    assert "FCN study: Log2-MSE per configuration" in proc.stdout and "group mean" in proc.stdout
