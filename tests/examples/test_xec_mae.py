"""XEC example: the encoder / regressor / FCMAE model assembled from blocks, and the script end to end."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import run_contract as contract
import torch
from gradients import leave_identity_init, without_gradient
from torchrun_helpers import read_metrics, run_example
from xec.batches import Classical, Split, resolution
from xec.events import generate
from xec.geometry import build_geometry
from xec.mae import XECMAE, mae_loss
from xec.model import XECEncoder, XECRegressor, sensor_inputs

from blockyard.blocks import random_mask
from blockyard.train.serialize import unpack

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "xec_mae.py"
TIMEOUT = 300
TINY = {"dim": 8, "depth": 1, "token_dim": 16, "hex_dim": 8, "fusion_depth": 1}


@pytest.fixture(scope="module")
def world():
    geometry = build_geometry()
    events = generate(4, geometry, torch.Generator().manual_seed(0))
    return geometry, events, sensor_inputs(events.npho, events.time, events.time_mask)


@pytest.fixture
def mae(world):
    torch.manual_seed(0)
    geometry = world[0]
    model = XECMAE(XECEncoder(geometry, **TINY), geometry).eval()
    for p in model.parameters():  # leave the identity-at-init state: every branch must carry signal
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.05)
    return model


def test_sensor_inputs_zero_invalid_times_and_flag_them(world):
    _, events, x = world
    assert x.shape == (4, 3, 4760)
    assert torch.all(x[:, 1][events.time_mask] == 0) and torch.all(x[:, 2] == (~events.time_mask).float())
    torch.testing.assert_close(x[:, 0], (events.npho / 1000).sqrt())
    with pytest.raises(ValueError, match="npho, time, time_mask: expected"):
        sensor_inputs(events.npho[:, :10], events.time, events.time_mask)


def test_regressor_and_mae_shapes_and_every_parameter_gets_a_gradient(world, one_thread):
    """Off the identity-at-init state (whose zero-init branches block the gradient upstream of them on step one),
    every parameter of the regressor, and every parameter of the MAE, gets a gradient from its own loss alone."""
    geometry, events, x = world
    torch.manual_seed(0)
    encoder = XECEncoder(geometry, **TINY)
    reg = XECRegressor(encoder)
    mae = XECMAE(encoder, geometry)  # shares the encoder
    leave_identity_init(mae)
    leave_identity_init(reg)
    dead = events.dead.expand(4, -1)
    out = reg(x, dead)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert without_gradient(reg) == set()
    mae.zero_grad(set_to_none=True)
    hidden = random_mask(4, 4760, 0.6, valid=~dead, generator=torch.Generator().manual_seed(1))
    result = mae(x, hidden | dead)
    assert result.recon.shape == (4, 4760) and result.tokens.shape == (4, 7, 16)
    mae_loss(result.recon, x[:, 0], hidden).backward()
    assert without_gradient(mae) == set()
    with pytest.raises(ValueError, match="x: expected"):
        reg(x[:, :2], dead)
    with pytest.raises(ValueError, match="mask: expected bool"):
        reg(x, dead.float())


def test_masked_sensors_never_influence_the_encoder_or_the_reconstruction(world, mae, one_thread):
    """Guarantee (model.py docstring): everything the encoder returns, hence the fused tokens, the
    regression output and the whole MAE reconstruction (at visible AND masked sensors), is a function
    of the visible sensors' inputs and of the mask only: overwriting all three input channels at the
    masked sensors with anything (here noise, and huge values) changes no output bit. On the image
    faces a feature cell is moreover exactly 0 when all its sensors are masked."""
    _, events, x = world
    dead = events.dead.expand(4, -1)
    hidden = random_mask(4, 4760, 0.6, valid=~dead, generator=torch.Generator().manual_seed(2))
    mask = hidden | dead
    noisy = torch.where(mask.unsqueeze(1), 1e3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)), x)
    with torch.no_grad():
        ref, per = mae.encoder(x, mask), mae.encoder(noisy, mask)
        assert torch.equal(ref.tokens, per.tokens)
        for a, b in zip(ref.faces, per.faces):
            assert torch.equal(a.features, b.features) and torch.equal(a.token, b.token)
            assert torch.all(a.features.masked_select(a.mask.unsqueeze(1)) == 0)
        for a, b in zip(ref.hex_nodes, per.hex_nodes):
            assert torch.equal(a, b)
        assert torch.equal(mae(x, mask).recon, mae(noisy, mask).recon)
        # control: the same perturbation without the mask reaches the output, so the test can fail
        assert not torch.allclose(mae(x, torch.zeros_like(mask)).recon, mae(noisy, torch.zeros_like(mask)).recon)
        # and one visible inner sensor does move the tokens
        visible = int((~mask[0, :4092]).nonzero()[0])
        bumped = x.clone()
        bumped[0, 0, visible] += 1.0
        assert not torch.equal(mae.encoder(bumped, mask).tokens[0], ref.tokens[0])


def test_mae_loss_counts_only_masked_live_sensors(world, mae, one_thread):
    _, events, x = world
    dead = events.dead.expand(4, -1)
    hidden = random_mask(4, 4760, 0.6, valid=~dead, generator=torch.Generator().manual_seed(4))
    live = int((~events.dead).sum())
    assert not (hidden & dead).any() and torch.all(hidden.sum(1) == round(0.6 * live))
    recon = mae(x, hidden | dead).recon.detach().requires_grad_(True)
    target = x[:, 0]
    loss = mae_loss(recon, target, hidden)
    naive = sum(float((recon[b, n].detach() - target[b, n]) ** 2) for b in range(4) for n in hidden[b].nonzero()[:, 0])
    assert float(loss.detach()) == pytest.approx(naive / int(hidden.sum()), rel=1e-5)
    # changing the target at visible or dead sensors changes nothing; at one hidden sensor it does
    other = torch.where(hidden, target, torch.randn_like(target))
    assert torch.equal(mae_loss(recon, other, hidden), loss)
    moved = target.clone()
    moved[0, int(hidden[0].nonzero()[0])] += 1.0
    assert float(mae_loss(recon, moved, hidden).detach()) != float(loss.detach())
    loss.backward()
    assert torch.all(recon.grad[~hidden] == 0) and (recon.grad[hidden] != 0).float().mean() > 0.99


def test_classical_estimators_beat_the_training_mean(one_thread):
    geometry = build_geometry()
    full, test = Split(300, geometry, seed=11), Split(100, geometry, seed=12)
    train = full.head(200)  # a labelled subset: standardised by its own labels, events sliced alike
    assert train.n == 200 and torch.equal(train.events.npho, full.events.npho[:200])
    torch.testing.assert_close(train.z.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    est = resolution(Classical(geometry, train).predict(test.events), test.targets)
    mean = resolution(train.mean.expand(100, -1), test.targets)
    for name in ("u", "v", "energy", "t0"):
        assert est[name]["rmse"] < 0.5 * mean[name]["rmse"], name
    assert est["w"]["rmse"] != est["w"]["rmse"]  # no depth estimator: NaN, not a fake number


STAGES = ("pretrain", "finetune", "scratch")
#: The smoke runs here judge learning, so they train the network alone: the default ``--prior classical`` starts
#: every regressor at the calibrated classical estimates, which 8 steps on 32 events cannot improve (its validation
#: loss stays within 0.2%; the prior is tested in test_xec_heads.py, and end to end there with the label study).
NETWORK_ALONE = ("--prior", "none")
METRICS = [f"{stage}/metrics.jsonl" for stage in STAGES]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One finished 2-process smoke run: checked end to end, copied for each run-contract check, and the
    reference of the killed-and-resumed run."""
    out = tmp_path_factory.mktemp("xec") / "run"
    return out, run_example(SCRIPT, out, *NETWORK_ALONE, timeout=TIMEOUT)


def assert_learned(out: Path, drop: float, baseline: float | None = None) -> None:
    """Pretraining's validation loss fell by the fraction ``drop`` from epoch 1 to 2, and each regression stage's
    fell (fixed validation events and masks: with a no-op optimizer step every one stays equal); with
    ``baseline``, both regressors beat the summary's own "train mean" predictor on the test events: their squared
    error relative to its, averaged over the 5 targets, is below ``baseline``.

    Measured over seeds 0-2 with the seed's token head (``--head tokens``): validation-loss ratios 0.81-0.95 and
    baseline ratios 0.82-0.93, against 1.0 and 1.11-1.12 with a no-op optimizer step; with fp16 and --accum 2
    (2 steps an epoch) validation-loss ratios 0.79-0.95, while the baseline ratio reaches 1.00. The map head (the
    default) starts at the light centroid on (u, v): at seed 0 its regression stages' ratios were 0.977-0.986
    (0.994-0.998 with fp16 and --accum 2) and its baseline ratios 0.57-0.59, so for them only a fall is required.
    """
    for stage in STAGES:
        first, last = (r["val_loss"] for r in read_metrics(out / stage / "metrics.jsonl"))
        assert last < (1 - (drop if stage == "pretrain" else 0.0)) * first, (stage, first, last)
    if baseline is not None:
        results = json.loads((out / "summary.json").read_text())["results"]
        mean = results["train mean"]
        for name in ("finetune", "scratch"):
            ratio = sum((results[name][t]["rmse"] / mean[t]["rmse"]) ** 2 for t in mean) / len(mean)
            assert ratio < baseline, (name, ratio, results[name], mean)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_smoke_run_pretrains_finetunes_learns_and_reports(ddp_run):
    out, proc = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["per_rank_batch"] == 4
    assert list(summary["results"]) == ["train mean", "classical", "finetune", "scratch"]
    for name in ("finetune", "scratch"):
        for target in ("u", "v", "w", "energy", "t0"):
            assert summary["results"][name][target]["res68"] >= 0
    for stage in STAGES:
        records = read_metrics(out / stage / "metrics.jsonl")
        assert [r["epoch"] for r in records] == [1, 2]
        assert records[-1]["opt_step"] == 8  # 32 events / 8 per step = 4 steps, 2 epochs
        assert (out / stage / "checkpoints").is_dir()
    assert "val_sensor_mean_mse" in read_metrics(out / "pretrain" / "metrics.jsonl")[0]
    assert_learned(out, drop=0.03, baseline=0.97)
    assert "test resolution" in proc.stdout and "energy [MeV]" in proc.stdout
    assert (out / "predictions.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


ON_A_FINISHED_RUN = {
    "used_out_is_refused": contract.check_used_out_is_refused,
    "damaged_checkpoints_are_refused": contract.check_damaged_checkpoints_are_refused,
    "changed_architecture_is_refused": lambda script, out, *extra: contract.check_changed_config_is_refused(
        script, out, "--dim", "12", *extra, key="dim: saved 8, requested 12"),
    "overwrite_keeps_the_old_run": contract.check_overwrite_keeps_the_old_run,
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("check", list(ON_A_FINISHED_RUN))
def test_run_contract_on_a_finished_run(ddp_run, tmp_path, check):
    """A launch on a copy of the finished run: refused with every file unchanged, or (overwrite) moved aside."""
    ON_A_FINISHED_RUN[check](SCRIPT, Path(shutil.copytree(ddp_run[0], tmp_path / "run")), *NETWORK_ALONE)


@pytest.mark.slow
@pytest.mark.distributed
def test_concurrent_runs_and_fp16_with_accumulation_trains_with_a_real_scaler(tmp_path):
    """Two runs at once on one folder: one is refused; the other (fp16, 2 micro-batches per step) trains
    through a real GradScaler: its scale is checkpointed, and skipped overflow steps are counted."""
    out = tmp_path / "run"
    contract.check_concurrent_runs(SCRIPT, out, "--precision", "fp16", "--accum", "2", *NETWORK_ALONE)
    summary = json.loads((out / "summary.json").read_text())
    for stage in STAGES:
        newest = sorted((out / stage / "checkpoints").glob("step_*"))[-1]
        stepper, _ = unpack((newest / "stepper.safetensors").read_bytes())
        scale = stepper["scaler"]["scale"]
        assert scale > 0 and math.log2(scale) % 1 == 0, stepper  # a real scaler: a power of two
        # 4 micro-batches of 8 per epoch, 2 per step: 4 steps in 2 epochs, taken or skipped on overflow
        assert summary["stages"][stage]["opt_steps"] + stepper["skipped"] == 4 == stepper["steps"] + stepper["skipped"]
    assert_learned(out, drop=0.02)  # 2 steps an epoch here, one of them perhaps skipped on an overflow


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(ddp_run, tmp_path):
    """SIGKILL after the run's optimizer step 14: the 6th of fine-tuning, in its 2nd epoch (pretraining took 8 and
    is finished, fine-tuning's epoch-1 checkpoint exists); then --resume auto: pretraining's best weights are
    reloaded, fine-tuning continues from its epoch 1, the scratch stage starts."""
    out = tmp_path / "run"
    contract.check_sigkill_resume_is_exact(SCRIPT, out, ddp_run[0], METRICS, 14, *NETWORK_ALONE)
    ref = json.loads((ddp_run[0] / "summary.json").read_text())["table"]  # the results, as printed
    assert json.loads((out / "summary.json").read_text())["table"] == ref
