"""FNO shootout: the simulator, loss, metrics and failure rule, and the sweep end to end under the run contract."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from fno.arms import (
    ARMS,
    PtychoNet,
    Reconstruction,
    classify_failure,
    deepest_levels,
    physics_loss,
    reconstruction_metrics,
)
from fno.sim import diffract, make_probe, simulate, stitch
from fno.verdict import plan_verdict
from fno_shootout import parse_args, stage_b_depths
from run_contract import (
    check_changed_config_is_refused,
    check_concurrent_runs,
    check_overwrite_keeps_the_old_run,
    check_used_out_is_refused,
    run,
)
from safetensors.torch import load_file
from torchrun_helpers import read_metrics, run_example

from blockyard.blocks import count_parameters

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fno_shootout.py"
# Stage A: 2 arms x 2 seeds = 4 runs of 2 epochs x 4 optimizer steps; under 2 processes each trains 2 runs. Stage B:
# the winner among the plan's arms (hybrid, the only one here) at 4 levels (the deepest 16 px patches hold), 2 runs
SWEEP = ("--arms", "hybrid,stable_layerscale", "--seeds", "2")
STEPS_PER_RUN = 8


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


def test_true_object_has_zero_physics_loss_up_to_the_photon_noise_and_perfect_metrics():
    nphotons = 1e12
    scan = simulate(32, 16, 8, make_probe(16), nphotons=nphotons, generator=torch.Generator().manual_seed(2))
    rec = Reconstruction(scan.patches.abs(), scan.patches.angle())
    # on noise-free data: zero up to float32 rounding (measured 4e-8; a wrong FFT norm, shift or probe is O(1))
    clean = diffract(scan.patches, scan.probe).float()[:, None]
    assert physics_loss(rec, clean, scan.probe, scale=clean.mean()) < 1e-6
    # on the simulated counts: exactly the photon-noise floor. The observed amplitude is sqrt(Poisson(lam)) / s with
    # lam = (s * amp)^2 and s = sqrt(nphotons / mean sum |probe * patch|^2) (the simulator's photon scaling); for
    # lam >> 1, sqrt(Poisson(lam)) has standard deviation 1/2 (delta method), so |obs - amp| averages
    # sqrt(2 / pi) / (2 s): 1.18e-5 of the mean amplitude here (measured 0.99x that over seeds 2-7)
    s = math.sqrt(nphotons / float((scan.patches.cdouble() * scan.probe).abs().square().sum((-2, -1)).mean()))
    floor = math.sqrt(2 / math.pi) / (2 * s) / float(scan.diffraction.mean())
    loss = float(physics_loss(rec, scan.diffraction, scan.probe, scale=scan.diffraction.mean()))
    assert loss == pytest.approx(floor, rel=0.05) and 1e-5 < floor < 1.5e-5
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
    assert classify_failure(True, 0.1, 0.29, 0.5, init_val=0.29) == "stalled"  # no lower than before training
    assert classify_failure(True, 0.1, 0.29, 0.5, init_val=0.30) is None
    assert classify_failure(True, 0.1, 0.31, 0.5, init_val=0.30) == "diverged"  # the earlier kinds come first


def test_stage_b_depths_follow_the_plan_and_report_what_the_patch_cannot_hold():
    assert [deepest_levels(p) for p in (16, 32, 48, 64, 256)] == [4, 5, 5, 6, 8]
    for size in (32, 64):  # the deepest really builds and runs; one more level is refused by HybridUNO
        PtychoNet(ARMS["hybrid"].block, 2, deepest_levels(size), 2)(torch.rand(1, 1, size, size))
        with pytest.raises(ValueError, match="this size allows at most"):
            PtychoNet(ARMS["hybrid"].block, 2, deepest_levels(size) + 1, 2)(torch.rand(1, 1, size, size))
    # the plan's geometry: 64 px patches, Stage A at 4 levels -> Stage B 6 (the deepest) and 8 (twice: impossible)
    depths, skipped = stage_b_depths("auto", 4, 64)
    assert depths == [6] and list(skipped) == [8] and "hold at most 6 levels" in skipped[8]
    assert stage_b_depths("auto", 3, 32) == ([5], {6: "32 px patches hold at most 5 levels (coarsest level at least "
                                                        "2x2)"})
    assert stage_b_depths("6,8", 3, 64)[0] == [6] and stage_b_depths("none", 3, 32) == ([], {})
    for bad in ("3", "2,5", "x", ""):
        with pytest.raises(ValueError, match="--stage-b-levels: expected"):
            stage_b_depths(bad, 3, 32)


def test_max_channels_reaches_the_model_and_defaults_to_stage_a_s_widest_level():
    args = parse_args(["--levels", "3", "--hidden", "16"])
    assert args.max_channels == 64 and args.epochs == 20  # the plan's cap on comparison runs
    assert parse_args(["--max-channels", "24"]).max_channels == 24
    net = PtychoNet(ARMS["hybrid"].block, 16, 5, 8, max_channels=24)
    assert net.core.widths == [16, 24, 24, 24, 24]
    assert [m.in_channels for m in net.core.down] == [16, 24, 24, 24]
    assert PtychoNet(ARMS["hybrid"].block, 16, 3, 8, max_channels=64).core.widths == [16, 32, 64]


def records(out: Path, stage: str = "runs") -> dict[str, dict]:
    """Every finished run's record of a stage (``runs`` = A, ``stage_b``) without its ``*_s`` timing fields."""
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if not k.endswith("_s")}
            for p in sorted((out / stage).glob("*.json"))}


def weights(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*_model.safetensors"))}


def assert_same_sweep(out: Path, reference: Path) -> None:
    """The same per-run records (timing aside), weights, metrics and summary as ``reference``."""
    assert records(out) == records(reference) and records(out, "stage_b") == records(reference, "stage_b")
    assert weights(out) == weights(reference)
    assert read_metrics(out / "metrics.jsonl") == read_metrics(reference / "metrics.jsonl")
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-process smoke sweep, shared (read-only) by the tests below."""
    out = tmp_path_factory.mktemp("fno") / "run"
    run_example(SCRIPT, out, *SWEEP)
    return out


@pytest.fixture
def used_out(finished, tmp_path):
    """A private copy of the finished sweep's folder."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.mark.slow  # 2-process torchrun launches
def test_smoke_sweep_learns_and_writes_everything(finished):
    summary = json.loads((finished / "summary.json").read_text())
    assert set(summary["table"]) == {"hybrid", "stable_layerscale"}
    for row in summary["table"].values():
        assert row["n"] == 2 and row["failures"] == 0
        assert math.isfinite(row["best_val"]["median"]) and math.isfinite(row["amp_ssim"]["median"])
    recs = records(finished)
    assert len(recs) == 4
    for r in recs.values():
        assert r["failure"] is None and r["stepper"]["steps"] == r["grad_norm"]["steps"] == STEPS_PER_RUN
        # learned: a no-op optimizer step leaves the validation loss exactly at its value at init
        assert r["final_val"] < 0.995 * r["init_val"], (r["arm"], r["seed"], r["init_val"], r["final_val"])
        assert r["curve"][0]["lr"] > 0 and r["curve"][-1]["lr"] != r["curve"][0]["lr"]  # the schedule steps
        assert r["stepper"]["scaler"] == {}  # fp32: no scaler
        # the test object's numbers beside the validation curve; both phase scores; no failure, so no failure step
        assert math.isfinite(r["test_loss"]) and 0 < r["phase_ssim_patch"] <= 1 and 0 < r["phase_ssim"] <= 1
        assert r["failure_step"] is None and r["schedule"] == "cosine"
    lines = read_metrics(finished / "metrics.jsonl")
    assert len(lines) == (4 + 2) * 2 and [m["step"] for m in lines[:2]] == [4, 8]  # (4 + 2) runs x 2 epochs
    assert [m["stage"] for m in lines] == ["A"] * 8 + ["B"] * 4
    # Stage B: beside Stage A's runs, never in them, depth in the name, widths capped at Stage A's widest (8)
    deep = records(finished, "stage_b")
    assert sorted(deep) == ["hybrid_levels4_seed0.json", "hybrid_levels4_seed1.json"]
    capped = PtychoNet(ARMS["hybrid"].block, hidden=4, levels=4, modes=4, max_channels=8)
    assert capped.core.widths == [4, 8, 8, 8]
    for r in deep.values():
        assert (r["stage"], r["levels"], r["failure"]) == ("B", 4, None)
        assert r["params"] == count_parameters(capped) < count_parameters(PtychoNet(ARMS["hybrid"].block, 4, 4, 4))
        assert r["final_val"] < 0.995 * r["init_val"]
    verdict = summary["verdict"]
    assert summary["run_kind"] == "comparison" and summary["stage_b"]["arm"] == verdict["winner"] == "hybrid"
    assert verdict["verdict"] == "undecided" and "missing: architectural fix (stable_zero_gamma), AGC" in \
        verdict["reasons"][0]
    assert (finished / "loss_curves.png").exists() and (finished / "reconstructions.png").exists()
    model = PtychoNet(ARMS["hybrid"].block, hidden=4, levels=2, modes=4)
    model.load_state_dict(load_file(str(finished / "runs" / "hybrid_seed0_model.safetensors")))  # pickle-free
    assert json.loads((finished / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow  # 2-process torchrun launches
def test_used_out_is_refused(used_out):
    check_used_out_is_refused(SCRIPT, used_out)


@pytest.mark.slow  # 2-process torchrun launches
def test_concurrent_runs(tmp_path):
    check_concurrent_runs(SCRIPT, tmp_path / "run", *SWEEP)


@pytest.mark.slow  # 2-process torchrun launches
def test_changed_config_is_refused(used_out):
    check_changed_config_is_refused(SCRIPT, used_out, *SWEEP, "--blocks-per-level", "2", key="blocks_per_level")


@pytest.mark.slow  # 2-process torchrun launches
def test_overwrite_keeps_the_old_run(used_out):
    check_overwrite_keeps_the_old_run(SCRIPT, used_out)


@pytest.mark.slow  # 2-process torchrun launches
def test_fp16_trains_with_a_real_scaler(tmp_path, finished):
    out = tmp_path / "run"
    run_example(SCRIPT, out, "--arms", "hybrid", "--precision", "fp16")
    r, fp32 = records(out)["hybrid_seed0.json"], records(finished)["hybrid_seed0.json"]
    stepper = r["stepper"]
    assert stepper["scaler"]["scale"] > 0 and stepper["steps"] + stepper["skipped"] == STEPS_PER_RUN  # a real scaler
    assert stepper["steps"] > 0 and r["failure"] is None and r["final_val"] < 0.995 * r["init_val"]  # it learned
    assert r["final_val"] != fp32["final_val"]  # in half precision


@pytest.mark.slow  # 2-process torchrun launches
def test_a_damaged_record_reruns_only_that_run(used_out, finished):
    """This sweep has no mid-run checkpoints: a run is finished once its record is written, so an
    unreadable record marks its run unfinished and --resume auto trains that run again, and only it."""
    damaged = used_out / "runs" / "stable_layerscale_seed1.json"
    damaged.write_bytes(damaged.read_bytes()[:-17])
    kept = {p: p.stat().st_mtime_ns for p in (used_out / "runs").glob("*.json") if p != damaged}
    code, text = run(SCRIPT, used_out, *SWEEP, "--resume", "auto")
    assert code == 0, text[-3000:]
    assert "(3 already done)" in text
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert_same_sweep(used_out, finished)


@pytest.mark.slow  # 2-process torchrun launches
def test_sigkill_mid_sweep_then_resume_reruns_exactly_the_unfinished_runs(tmp_path, finished):
    """--kill-at-step counts a process's optimizer steps over its runs: 11 = one run done, 3 steps into the next."""
    out = tmp_path / "run"
    code, text = run(SCRIPT, out, *SWEEP, "--kill-at-step", str(STEPS_PER_RUN + 3))
    assert code != 0, text[-3000:]
    assert not (out / "summary.json").exists()
    done = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "runs").glob("*.json")}
    # each process dies 3 steps into its 2nd run; the first to die ends the sweep: 1 or 2 runs finished
    assert 1 <= len(done) <= 2, sorted(done)
    code, text = run(SCRIPT, out, *SWEEP, "--resume", "auto")
    assert code == 0, text[-3000:]
    assert f"({len(done)} already done)" in text  # the finished runs were kept ...
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done} == done  # ... untouched
    assert_same_sweep(out, finished)  # and the others were trained again, as in an uninterrupted sweep


@pytest.mark.slow  # a 2-process torchrun launch
def test_the_plan_s_arms_give_a_verdict_computed_from_the_run_s_own_table(tmp_path):
    out = tmp_path / "run"
    proc = run_example(SCRIPT, out, "--arms", "hybrid,stable_zero_gamma,hybrid_agc", "--seeds", "2")
    summary = json.loads((out / "summary.json").read_text())
    deep = {int(k): v for k, v in summary["stage_b"]["levels"].items()}
    again = plan_verdict(summary["table"], deep, stage_b_arm=summary["stage_b"]["arm"])
    verdict = summary["verdict"]
    assert verdict["verdict"] == again.verdict and verdict["reasons"] == again.reasons
    assert verdict["verdict"] in ("gold", "silver", "pivot")  # 2 successful seeds per arm: every median is judged
    assert verdict["checks"] == [c._asdict() for c in again.checks]
    assert None not in [c.passed for c in again.checks]
    assert f"plan verdict: {verdict['verdict'].upper()}" in proc.stdout
    assert list(deep) == [4] and set(records(out, "stage_b")) == {f"{verdict['winner']}_levels4_seed{s}.json"
                                                                   for s in (0, 1)}


@pytest.mark.slow  # a 2-process torchrun launch
def test_more_epochs_than_the_plan_s_cap_is_labelled_a_stress_test(tmp_path):
    out = tmp_path / "run"
    proc = run_example(SCRIPT, out, "--arms", "hybrid", "--epochs", "21", "--stage-b-levels", "none", "--seeds", "1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_kind"] == "stress test" and summary["epochs"] == 21
    assert "STRESS TEST (21 epochs > the plan's 20-epoch cap)" in proc.stdout
    assert summary["stage_b"]["levels"] == {} and not list((out / "stage_b").glob("*.json"))
