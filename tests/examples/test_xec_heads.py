"""XEC regression heads: the soft-argmax read-out of the inner face, the classical prior, the new flags end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import run_contract as contract
import torch
from gradients import leave_identity_init, without_gradient
from torchrun_helpers import read_metrics, run_example
from xec.batches import channel_dropout
from xec.events import R_INNER, dead_channels, generate
from xec.geometry import build_geometry
from xec.heads import MapRegressor, TokenRegressor, inner_cell_coordinates, soft_argmax
from xec.model import XECEncoder, sensor_inputs

from blockyard.blocks import random_mask
from blockyard.train.serialize import unpack

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "xec_mae.py"
TINY = {"dim": 8, "depth": 1, "token_dim": 16, "hex_dim": 8, "fusion_depth": 1}
UV_MEAN, UV_STD = torch.tensor([1.0, -2.0]), torch.tensor([15.0, 30.0])


@pytest.fixture(scope="module")
def world():
    geometry = build_geometry()
    events = generate(3, geometry, torch.Generator().manual_seed(0))
    x = sensor_inputs(events.npho, events.time, events.time_mask)
    hidden = random_mask(3, 4760, 0.2, valid=~events.dead.expand(3, -1), generator=torch.Generator().manual_seed(1))
    return geometry, x, hidden | events.dead


def test_inner_cell_coordinates_are_the_mean_of_each_cells_sensors(world):
    geometry = world[0]
    coords = inner_cell_coordinates(geometry)
    index = geometry.inner.index_map.tolist()
    pos = geometry.position.double()
    assert coords.shape == (47, 22, 2)
    for r in (0, 23, 46):  # 46: the padded half-cell (sensor row 92 only)
        for c in (0, 11, 21):
            ids = [index[y][x] for y in (2 * r, 2 * r + 1) for x in (2 * c, 2 * c + 1) if y < 93]
            u = sum(float(pos[i, 2]) for i in ids) / len(ids)
            v = sum(R_INNER * (math.atan2(float(pos[i, 1]), float(pos[i, 0])) % (2 * math.pi) - math.pi)
                    for i in ids) / len(ids)
            torch.testing.assert_close(coords[r, c].double(), torch.tensor([u, v], dtype=torch.float64),
                                       atol=1e-4, rtol=0)


def test_soft_argmax_equals_a_per_sample_loop_and_never_reads_masked_cells():
    g = torch.Generator().manual_seed(0)
    logits, features = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 6, 4, 5, generator=g)
    coords = torch.randn(4, 5, 2, generator=g)
    mask = torch.rand(3, 4, 5, generator=g) < 0.4
    mask[2] = True  # a face with nothing visible: zero weights, no NaN
    pos, pooled = soft_argmax(logits, mask, coords, features)
    poisoned = soft_argmax(logits.masked_fill(mask.unsqueeze(1), float("nan")), mask, coords,
                           features.masked_fill(mask.unsqueeze(1), float("nan")))
    torch.testing.assert_close(poisoned[0], pos, rtol=0, atol=0)
    torch.testing.assert_close(poisoned[1], pooled, rtol=0, atol=0)
    for b in range(3):
        for k in range(2):
            cells = [(y, x) for y in range(4) for x in range(5) if not mask[b, y, x]]
            expected_pos, expected_feat = torch.zeros(2), torch.zeros(6)
            if cells:
                w = torch.softmax(torch.stack([logits[b, k, y, x] for y, x in cells]), 0)
                for weight, (y, x) in zip(w, cells):
                    expected_pos += weight * coords[y, x]
                    expected_feat += weight * features[b, :, y, x]
            torch.testing.assert_close(pos[b, k], expected_pos, atol=1e-5, rtol=0)
            torch.testing.assert_close(pooled[b, k], expected_feat, atol=1e-5, rtol=0)


def test_untrained_map_head_predicts_the_light_centroid_of_the_inner_cells(world, one_thread):
    """One map with gain 2: softmax(2 log q) weights cells by q^2, i.e. by photons (q = sqrt(npho / 1000))."""
    geometry, x, mask = world
    torch.manual_seed(0)
    model = MapRegressor(XECEncoder(geometry, **TINY), geometry, UV_MEAN, UV_STD, maps=1).eval()
    with torch.no_grad():
        model.gain.fill_(2.0)
        z = model(x, mask)
    coords = (inner_cell_coordinates(geometry) - UV_MEAN) / UV_STD
    index = geometry.inner.index_map.tolist()
    for b in range(x.shape[0]):
        num, den = torch.zeros(2, dtype=torch.float64), 0.0
        for r in range(47):
            for c in range(22):
                qs = [float(x[b, 0, index[y][xx]]) for y in (2 * r, 2 * r + 1) if y < 93
                      for xx in (2 * c, 2 * c + 1) if not mask[b, index[y][xx]]]
                if qs:
                    weight = (sum(qs) / len(qs) + 1e-3) ** 2
                    num += weight * coords[r, c].double()
                    den += weight
        torch.testing.assert_close(z[b, :2].double(), num / den, atol=1e-4, rtol=0)
    assert z[:, 2:].abs().max() == 0  # w, energy, t0 start at the training mean


@pytest.mark.parametrize("head", ["tokens", "maps"])
def test_with_the_prior_the_untrained_model_is_the_classical_estimator_and_every_parameter_learns(world, head,
                                                                                                 one_thread):
    geometry, x, mask = world
    torch.manual_seed(0)
    encoder = XECEncoder(geometry, **TINY)
    model = (MapRegressor(encoder, geometry, UV_MEAN, UV_STD, prior=True) if head == "maps"
             else TokenRegressor(encoder, prior=True))
    prior = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x, mask, prior), prior, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prior"):
        model(x, mask)
    leave_identity_init(model, std=0.3)
    out = model(x, mask, prior)
    assert not torch.allclose(out, prior)
    out.square().sum().backward()
    assert without_gradient(model) == set()


def test_map_head_masked_sensors_never_change_the_output(world, one_thread):
    geometry, x, mask = world
    torch.manual_seed(0)
    model = MapRegressor(XECEncoder(geometry, **TINY), geometry, UV_MEAN, UV_STD).eval()
    leave_identity_init(model, std=0.3)
    noisy = torch.where(mask.unsqueeze(1), torch.randn_like(x) * 5, x)
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, mask), model(x, mask), rtol=0, atol=0)


def test_channel_dropout_keeps_the_dead_and_hides_a_fixed_share_of_the_live_sensors():
    dead = dead_channels()
    live = int((~dead).sum())
    mask = channel_dropout(dead, 5, 0.1, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4760) and mask[:, dead].all()
    assert (mask[:, ~dead].sum(1) == round(0.1 * live)).all()
    assert not torch.equal(mask[0], mask[1])  # a new draw per event
    assert torch.equal(mask, channel_dropout(dead, 5, 0.1, torch.Generator().manual_seed(0)))  # resumable
    assert torch.equal(channel_dropout(dead, 2, 0.0, torch.Generator()), dead.expand(2, -1))
    with pytest.raises(ValueError, match="ratio"):
        channel_dropout(dead, 2, 1.0, torch.Generator())


@pytest.mark.slow
@pytest.mark.distributed
def test_label_study_smoke_reuses_one_pretraining_per_seed_and_resumes_exactly(tmp_path):
    """--study labels end to end on 2 processes (one pretraining per seed, fine-tune and scratch per budget,
    with every new flag on); then SIGKILL at the run's step 8, the 2nd step of seed 0's first scratch regression
    (pretraining 4 steps, fine-tuning 2), and --resume auto: the same metrics in every stage."""
    flags = ("--study", "labels", "--label-budgets", "8,16", "--seeds", "0,1", "--study-steps", "2",
             "--pretrain-epochs", "1",
             "--scheduler", "plateau", "--encoder-lr-scale", "0.3", "--channel-dropout", "0.1", "--prior", "classical")
    ref = tmp_path / "ref"
    proc = run_example(SCRIPT, ref, *flags, timeout=900)
    summary = json.loads((ref / "summary.json").read_text())
    names = [f"s{s}/pretrain" for s in (0, 1)] + [f"s{s}/n{n}/{a}" for s in (0, 1) for n in (8, 16)
                                                   for a in ("finetune", "scratch")]
    assert sorted(summary["stages"]) == sorted(names)
    # 8 labels / 8 per step: 1 step an epoch, 2 epochs; 16 labels: 2 steps, 1 epoch: the same 2 steps
    assert all(summary["stages"][n]["opt_steps"] == 2 for n in names if "/n" in n)
    rmse = torch.tensor(summary["rmse"])
    assert rmse.shape == (2, 2, 3, 5) and torch.isnan(rmse[:, :, 0, 2]).all() and torch.isfinite(rmse[:, :, 1:]).all()
    assert "median [IQR]" in proc.stdout
    for arm, scale in (("finetune", 0.3), ("scratch", 1.0)):  # --encoder-lr-scale: the pretrained encoder only
        newest = sorted((ref / "s0" / "n16" / arm / "checkpoints").glob("step_*"))[-1]
        encoder, head = unpack((newest / "optimizer.safetensors").read_bytes())[0]["param_groups"]
        assert (encoder["lr_scale"], head["lr_scale"]) == (scale, 1.0)
        assert encoder["lr"] == pytest.approx(scale * head["lr"]) and head["lr"] > 0
    metrics = [f"{n}/metrics.jsonl" for n in names]
    contract.check_sigkill_resume_is_exact(SCRIPT, tmp_path / "run", ref, metrics, 8, *flags)


@pytest.mark.slow
def test_onecycle_flag_sets_the_logged_learning_rate(tmp_path):
    """One process: the pretraining's lr at the end of each epoch is one_cycle's (4 steps an epoch, 2 epochs)."""
    out = tmp_path / "run"
    run_example(SCRIPT, out, "--scheduler", "onecycle", "--inpaint", "off", "--scratch", "off", nproc=1)
    lrs = [r["lr"] for r in read_metrics(out / "pretrain" / "metrics.jsonl")]
    # 8 steps, pct_start 0.05: peak at step -0.6, cosine down to 1e-3 / 25 / 1e4 at step 7
    assert lrs[1] == pytest.approx(1e-3 / 25 / 1e4)
    assert lrs[0] == pytest.approx(1e-3 / 25 / 1e4 + (1e-3 - 1e-3 / 25 / 1e4) / 2
                                   * (1 + math.cos(math.pi * (3 + 0.6) / (7 + 0.6))))


@pytest.mark.slow
def test_plateau_flag_halves_the_lr_after_each_epoch_that_did_not_improve(tmp_path):
    """One process, fine-tuning 8 epochs of one step at lr 0.3 (high, so the validation loss does not always
    fall): each epoch's lr is the previous one, halved when the previous epoch's validation loss was not better
    than the best before it (relative threshold 1e-4); at this seed that happens at least once."""
    out = tmp_path / "run"
    run_example(SCRIPT, out, "--scheduler", "plateau", "--inpaint", "off", "--scratch", "off", "--labeled", "8",
                "--epochs", "8", "--lr", "0.3", nproc=1)
    records = read_metrics(out / "finetune" / "metrics.jsonl")
    lrs, val = [r["lr"] for r in records], [r["val_loss"] for r in records]
    assert lrs[0] == pytest.approx(0.3)
    for e in range(len(records) - 1):
        worse = e > 0 and val[e] >= min(val[:e]) * (1 - 1e-4)
        assert lrs[e + 1] == pytest.approx(lrs[e] * (0.5 if worse else 1.0)), (e, lrs, val)
    assert min(lrs) < 0.3
