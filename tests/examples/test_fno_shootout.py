import json
import math

import fno_shootout
import pytest
import torch
from fno.arms import ARMS, PtychoNet, Reconstruction, classify_failure, physics_loss, reconstruction_metrics
from fno.sim import diffract, make_probe, simulate, stitch
from safetensors.torch import load_file


def test_stitch_recovers_the_object_region():
    g = torch.Generator().manual_seed(0)
    scan = simulate(48, 16, 4, make_probe(16), generator=g)
    image = stitch(scan.patches, scan.grid, scan.stride)
    b = (16 - 4) // 2
    torch.testing.assert_close(image, scan.obj[b:b + image.shape[0], b:b + image.shape[1]])
    two = stitch(torch.stack([scan.patches.real, scan.patches.imag], 1), scan.grid, scan.stride)
    torch.testing.assert_close(two[0], image.real)


def test_diffraction_conserves_energy_and_noise_follows_the_photon_budget():
    g = torch.Generator().manual_seed(1)
    probe = make_probe(16)
    clean = simulate(32, 16, 8, probe, nphotons=1e12, generator=torch.Generator().manual_seed(1))
    amp = diffract(clean.patches, probe)
    # Parseval with the ortho FFT: total far-field intensity equals the exit wave's.
    torch.testing.assert_close(amp.square().sum((-2, -1)), (clean.patches * probe).abs().square().sum((-2, -1)),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(clean.diffraction[:, 0], amp.float(), rtol=2e-2, atol=1e-4)
    noisy = simulate(32, 16, 8, probe, nphotons=1e3, generator=g)
    assert (noisy.diffraction[:, 0] - diffract(noisy.patches, probe)).abs().mean() > 1e-3


def test_true_object_has_zero_physics_loss_and_perfect_metrics():
    scan = simulate(32, 16, 8, make_probe(16), nphotons=1e12, generator=torch.Generator().manual_seed(2))
    rec = Reconstruction(scan.patches.abs(), scan.patches.angle())
    assert physics_loss(rec, scan.diffraction, scan.probe, scale=scan.diffraction.mean()) < 2e-2
    amp = stitch(scan.patches.abs(), scan.grid, scan.stride)
    phase = stitch(scan.patches.angle(), scan.grid, scan.stride) + 0.7  # a global phase is unobservable
    b = (16 - 8) // 2
    m = reconstruction_metrics(amp, phase, scan.obj[b:b + amp.shape[0], b:b + amp.shape[1]])
    assert m["amp_ssim"] > 0.999 and m["phase_ssim"] > 0.999 and m["phase_mae"] < 1e-4


def test_failure_rule():
    assert classify_failure(False, 0.1, 0.1, 0.5) == "non-finite"
    assert classify_failure(True, 0.1, math.nan, 0.5) == "non-finite"
    assert classify_failure(True, 0.1, 0.1, 1e-4) == "collapsed"
    assert classify_failure(True, 0.1, 0.31, 0.5) == "diverged"
    assert classify_failure(True, 0.1, 0.29, 0.5) is None


@pytest.mark.slow
def test_smoke_end_to_end_and_resume(tmp_path, capsys):
    arms = "hybrid,stable_layerscale"
    fno_shootout.main(["--smoke", "--out", str(tmp_path), "--arms", arms])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["table"]) == {"hybrid", "stable_layerscale"}
    for row in summary["table"].values():
        assert row["n"] == 1
        assert row["failures"] == 1 or math.isfinite(row["best_val"]["median"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2  # 2 arms x 2 epochs
    assert (tmp_path / "loss_curves.png").exists() and (tmp_path / "reconstructions.png").exists()
    weights = load_file(str(tmp_path / "runs" / "hybrid_seed0_model.safetensors"))
    model = PtychoNet(ARMS["hybrid"].block, hidden=4, levels=2, modes=4)
    model.load_state_dict(weights)  # a pickle-free file that rebuilds the trained model
    record = json.loads((tmp_path / "runs" / "hybrid_seed0.json").read_text())
    assert record["curve"][0]["lr"] > 0 and record["curve"][-1]["lr"] != record["curve"][0]["lr"]  # it steps
    before = (tmp_path / "runs" / "hybrid_seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    fno_shootout.main(["--smoke", "--out", str(tmp_path), "--arms", arms, "--resume", "auto"])
    assert "2 already done" in capsys.readouterr().out
    assert (tmp_path / "runs" / "hybrid_seed0.json").stat().st_mtime_ns == before
