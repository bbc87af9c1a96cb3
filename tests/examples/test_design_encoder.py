"""Design decomposition, stage 1: the encoder model, its scores, and design_encoder.py end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import run_contract as contract
import torch
from design.build_data import build
from design.dataset import open_split
from design.evaluate import STRUCTURE_ROWS, structure_rows, structure_scores
from design.models import (
    SOFT_CHANNELS,
    DesignEncoder,
    EncoderOutput,
    hard_structure,
    load_encoder,
    one_hot_structure,
)
from design.vocab import NUM_COLORS
from design_encoder import encoder_loss
from torchrun_helpers import read_metrics, run_example

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "design_encoder.py"
DESIGNS = 300  # the script's --smoke default: the built data is reused, not rebuilt
TIMEOUT = 300


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("design") / "data"
    build(out, designs=DESIGNS, size=64, seed=0)
    return out


@pytest.fixture(scope="module")
def designs(smoke_data):
    return open_split(smoke_data, "val").get_batch([0, 1, 2])


def test_soft_structure_is_the_heads_as_probabilities_and_passes_gradients_to_the_image(designs, one_thread):
    """Soft F = sigmoid masks, softmax colour, hierarchy; the hard F thresholds it; d(soft F)/d(image) is not 0,
    through the colour probabilities too (what a reward back-propagates through). H != W."""
    torch.manual_seed(0)
    encoder = DesignEncoder(widths=(8, 16), head_depth=2).eval()
    image = designs.image[:2, :, :, :48].clone().requires_grad_(True)
    out = encoder(image)
    soft = encoder.soft_structure(image)
    assert soft.shape == (2, SOFT_CHANNELS, 64, 48) and out.color.shape == (2, NUM_COLORS, 64, 48)
    torch.testing.assert_close(soft[:, :2], torch.sigmoid(torch.cat([out.text, out.image], 1)))
    torch.testing.assert_close(soft[:, 2:-1], torch.softmax(out.color, 1))
    torch.testing.assert_close(soft[:, 2:-1].sum(1), torch.ones(2, 64, 48))
    torch.testing.assert_close(soft[:, -1:], out.hierarchy)
    hard = encoder.structure(image)
    assert torch.equal(hard[:, 0], (out.text[:, 0] > 0).float())
    assert torch.equal(hard[:, 1], (out.image[:, 0] > 0).float())
    assert torch.equal(hard[:, 2], out.color.argmax(1).float()) and torch.equal(hard[:, 3], out.hierarchy[:, 0])
    weights = torch.randn(NUM_COLORS, 1, 1, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((soft[:, 2:-1] * weights).sum(), image)
    assert grad.abs().sum() > 0


def test_one_hot_and_hard_structure_round_trip_and_reject_non_ids(designs):
    f = designs.structure
    soft = one_hot_structure(f)
    assert soft.shape == (3, SOFT_CHANNELS, 64, 64)
    assert torch.equal(soft[:, 2:-1].argmax(1).float(), f[:, 2])
    assert torch.equal(soft[:, 2:-1].sum(1), torch.ones(3, 64, 64))
    assert torch.equal(hard_structure(soft), f)
    assert (f[:, 2] > 0).any() and (f[:, 0] > 0).any()  # the round trip saw colours and text
    for value in (0.5, float(NUM_COLORS), -1.0):
        bad = f.clone()
        bad[1, 2, 3, 5] = value
        with pytest.raises(ValueError, match="structure: expected colour ids"):
            one_hot_structure(bad)
    with pytest.raises(ValueError, match=r"soft: expected \(B, 22, H, W\)"):
        hard_structure(f)


def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return 1 - ((2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)).mean()


def test_encoder_loss_is_the_seeds_weighted_sum(designs):
    """Dice(text) + Dice(image) + 0.5 CE(colour) + MSE(hierarchy), each term written out here in float64."""
    g = torch.Generator().manual_seed(0)
    f = designs.structure
    out = EncoderOutput(text=torch.randn(3, 1, 64, 64, generator=g), image=torch.randn(3, 1, 64, 64, generator=g),
                        color=torch.randn(3, NUM_COLORS, 64, 64, generator=g),
                        hierarchy=torch.rand(3, 1, 64, 64, generator=g))
    loss = encoder_loss((1.0, 0.5, 1.0))(out, f)
    log_p = torch.log_softmax(out.color.double(), 1)
    ce = -log_p.gather(1, f[:, 2:3].long()).mean()
    terms = {"text": dice(out.text, f[:, :1]), "image": dice(out.image, f[:, 1:2]), "color": ce,
             "hierarchy": (out.hierarchy.double() - f[:, 3:]).square().mean()}
    for name, value in terms.items():
        torch.testing.assert_close(loss.terms[name].double(), value, rtol=1e-5, atol=1e-6)
    expected = terms["text"] + terms["image"] + 0.5 * terms["color"] + terms["hierarchy"]
    torch.testing.assert_close(loss.total.double(), expected, rtol=1e-5, atol=1e-6)


def test_structure_rows_and_scores_match_a_naive_loop():
    """Per design (B=3, H != W): IoU of each mask (empty vs empty = 1), colour accuracy, non-background hits,
    hierarchy MSE; the reduced non-background accuracy pools pixels over designs (not a mean of ratios)."""
    g = torch.Generator().manual_seed(3)
    target = torch.zeros(3, 4, 5, 7)
    pred = torch.zeros(3, 4, 5, 7)
    for f in (target, pred):
        f[:, :2] = (torch.rand(3, 2, 5, 7, generator=g) > 0.6).float()
        f[:, 2] = torch.randint(0, 4, (3, 5, 7), generator=g).float()
        f[:, 3] = torch.rand(3, 5, 7, generator=g)
    target[2, 1] = pred[2, 1] = 0  # no image in design 2, none predicted
    pred[1, 0] = 0  # no text predicted in design 1
    target[0, 2] = torch.where(target[0, 2] > 0, 1.0, 0.0)  # uneven non-background counts per design
    rows = structure_rows(pred, target).double()
    for b in range(3):
        for c in range(2):
            p = {(i, j) for i in range(5) for j in range(7) if pred[b, c, i, j] > 0.5}
            t = {(i, j) for i in range(5) for j in range(7) if target[b, c, i, j] > 0.5}
            assert rows[b, c].item() == pytest.approx((len(p & t) + 1e-6) / (len(p | t) + 1e-6), rel=1e-6)
        pixels = [(i, j) for i in range(5) for j in range(7)]
        right = [pred[b, 2, i, j] == target[b, 2, i, j] for i, j in pixels]
        fg = [target[b, 2, i, j] != 0 for i, j in pixels]
        assert rows[b, 2].item() == pytest.approx(sum(right) / 35)
        assert rows[b, 3].item() == sum(r and f for r, f in zip(right, fg)) and rows[b, 4].item() == sum(fg)
        se = sum((pred[b, 3, i, j].item() - target[b, 3, i, j].item()) ** 2 for i, j in pixels) / 35
        assert rows[b, 5].item() == pytest.approx(se, rel=1e-5)
    assert rows[2, 1] == 1.0 and rows[1, 0] < 1e-6
    scores = structure_scores(rows)
    assert scores["color_accuracy_fg"] == pytest.approx(float(rows[:, 3].sum() / rows[:, 4].sum()))
    assert scores["color_accuracy_fg"] != pytest.approx(float((rows[:, 3] / rows[:, 4]).mean()))
    assert scores["text_iou"] == pytest.approx(float(rows[:, 0].mean()))
    assert len(STRUCTURE_ROWS) == rows.shape[1]
    with pytest.raises(ValueError, match="pred: expected target's shape"):
        structure_rows(pred[:, :3], target)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, smoke_data):
    """One finished 2-process smoke run, shared by the checks below (each launch works on a copy)."""
    out = tmp_path_factory.mktemp("encoder") / "run"
    return out, run_example(SCRIPT, out, "--data", str(smoke_data), timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_smoke_run_learns_beats_the_empty_design_and_loads_back(ddp_run, smoke_data, one_thread):
    """After 90 steps of batch 8 the encoder beats predicting the empty design on both masks and on hierarchy,
    and its validation loss fell. Measured over seeds 0-2: text IoU 0.19-0.37 (empty design 0), image IoU
    0.46-0.68 (0.37), hierarchy MSE 0.042-0.048 (0.136), validation loss ratio epoch 3 / epoch 1 0.73-0.78; with
    the learning rate 0 (no step moves): 0.05, 0.02, 0.21 and ratio 1. load_encoder rebuilds the model that
    scored the summary's test numbers."""
    out, proc = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["designs"] == {"train": 240, "val": 30, "test": 30}
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["epoch"], r["opt_step"]) for r in records] == [(1, 30), (2, 60), (3, 90)]  # 240 designs / 8
    assert records[-1]["val_loss"] < 0.88 * records[0]["val_loss"]
    test, empty = summary["test"], summary["test_empty_design"]
    assert empty["text_iou"] < 1e-6 and empty["color_accuracy_fg"] == 0.0
    assert test["text_iou"] > empty["text_iou"] + 0.1
    assert test["image_iou"] > empty["image_iou"] + 0.04
    assert test["hierarchy_mse"] < 0.5 * empty["hierarchy_mse"]
    assert set(summary["passed"]) == {"text_iou", "image_iou", "color_accuracy", "hierarchy_mse"}
    assert "seed criterion" in proc.stdout and "colour accuracy, non-background" in proc.stdout
    assert (out / "predictions.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    encoder = load_encoder(out)
    assert not encoder.training
    batch = open_split(smoke_data, "test").load()
    with torch.no_grad():
        again = structure_scores(structure_rows(encoder.structure(batch.image), batch.structure))
    assert again == pytest.approx(test, rel=1e-6, abs=1e-7)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("check", ["used_out", "changed_widths"])
def test_run_contract_on_a_finished_run(ddp_run, tmp_path, check):
    out = Path(shutil.copytree(ddp_run[0], tmp_path / "run"))
    if check == "used_out":
        contract.check_used_out_is_refused(SCRIPT, out)
    else:
        contract.check_changed_config_is_refused(SCRIPT, out, "--widths", "8,12", key="widths: saved [8, 16], "
                                                                                      "requested [8, 12]")


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(ddp_run, smoke_data, tmp_path):
    """SIGKILL at optimizer step 45 (mid epoch 2; the epoch-1 checkpoint exists), then --resume auto: the metrics
    and the test table equal the uninterrupted run's."""
    out = tmp_path / "run"
    contract.check_sigkill_resume_is_exact(SCRIPT, out, ddp_run[0], ["metrics.jsonl"], 45, "--data", str(smoke_data))
    ref = json.loads((ddp_run[0] / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["test"] == ref["test"]
