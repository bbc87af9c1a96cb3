"""FNO shootout controls: the positive control fires the failure rule, time to failure, the validation object,
per-patch phase alignment, the clip sweep, the constant-lr regime and the seed-scale preset."""
from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fno.arms import PtychoNet, classify_failure, first_failure, resolve_arm
from fno.evaluate import Evaluation, evaluate, loss_scale, score_reconstruction
from fno.phase import align_patch_phases, patch_phase_offsets
from fno.report import print_clip_sweep, print_table, summarize
from fno.sim import make_probe, simulate_splits
from fno_shootout import Job, parse_args, run_one
from safetensors.torch import load_file

from blockyard.train import warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")
SLURM = Path(__file__).resolve().parents[2] / "examples" / "slurm"


def wrapped(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


# --- per-patch phase alignment ------------------------------------------------------------------------


def test_patch_offsets_recover_known_offsets_where_the_weight_is_nonzero():
    g = torch.Generator().manual_seed(0)
    true = (torch.rand(6, 9, 9, generator=g) * 2 - 1) * math.pi
    offsets = torch.tensor([0.0, 0.4, -1.3, 3.0, -3.1, 2.2])  # near +-pi too
    pred = wrapped(true - offsets[:, None, None])
    weight = torch.zeros(9, 9)
    weight[2:7, 2:7] = torch.rand(5, 5, generator=g) + 0.1
    pred[:, :2] = torch.rand(6, 2, 9, generator=g) * 6  # garbage where the weight is zero: must not matter
    found = patch_phase_offsets(pred, true, weight)
    torch.testing.assert_close(wrapped(found - offsets), torch.zeros(6), rtol=0, atol=1e-5)
    aligned = align_patch_phases(pred, true, weight)
    torch.testing.assert_close(wrapped(aligned - true)[:, 2:7, 2:7], torch.zeros(6, 5, 5), rtol=0, atol=1e-5)
    assert aligned.min() >= -math.pi and aligned.max() < math.pi


def test_patch_offsets_are_the_minimum_of_a_naive_search():
    g = torch.Generator().manual_seed(1)
    true = (torch.rand(4, 8, 8, generator=g) * 2 - 1) * math.pi
    pred = wrapped(true + torch.randn(4, 8, 8, generator=g) * 0.8 + torch.tensor([1.0, -2.0, 0.3, 2.9])[:, None, None])
    weight = make_probe(8).abs().square()
    grid = torch.linspace(-math.pi, math.pi, 36001, dtype=torch.float64)
    found = patch_phase_offsets(pred, true, weight)
    for p in range(4):  # the objective of the module docstring, evaluated at every candidate offset
        cost = [float((weight.double() * ((1j * (pred[p].double() + c)).exp() - (1j * true[p].double()).exp())
                       .abs().square()).sum()) for c in grid]
        best = float(grid[int(torch.tensor(cost).argmin())])
        gap = abs(math.remainder(float(found[p]) - best, 2 * math.pi))
        assert gap < 2 * float(grid[1] - grid[0]), (p, found[p], best)


def test_patch_offsets_reject_bad_input():
    with pytest.raises(ValueError, match="pred_phase: expected"):
        patch_phase_offsets(torch.zeros(8, 8), torch.zeros(8, 8), torch.ones(8, 8))
    with pytest.raises(ValueError, match="true_phase: expected"):
        patch_phase_offsets(torch.zeros(2, 8, 8), torch.zeros(2, 8, 7), torch.ones(8, 8))
    with pytest.raises(ValueError, match="weight: expected"):
        patch_phase_offsets(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8), torch.ones(7, 8))
    with pytest.raises(TypeError, match="complex"):
        patch_phase_offsets(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.cfloat), torch.ones(8, 8))


def test_the_per_patch_score_forgives_per_patch_offsets_and_the_stitched_one_does_not():
    scan = simulate_splits(48, 16, 4, make_probe(16), generator=torch.Generator().manual_seed(2)).test
    offsets = torch.rand(len(scan.patches), generator=torch.Generator().manual_seed(3)) * 4 - 2
    ev = Evaluation(0.0, scan.patches.abs().float(), wrapped(scan.patches.angle() + offsets[:, None, None]), 1.0)
    m, images = score_reconstruction(ev, scan)
    assert m["phase_ssim_patch"] > 0.999 and m["phase_mae_patch"] < 1e-4 and m["amp_ssim"] > 0.999
    assert m["phase_ssim"] < 0.9 and m["phase_mae"] > 0.3  # one offset for the image cannot undo them
    torch.testing.assert_close(images["phase_patch_aligned"], images["true_phase"], rtol=0, atol=1e-4)


# --- the validation object ----------------------------------------------------------------------------


def test_train_validation_and_test_are_three_different_objects():
    splits = simulate_splits(48, 16, 4, make_probe(16), generator=torch.Generator().manual_seed(0))
    objs = [s.obj for s in splits]
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = objs[i].abs().flatten(), objs[j].abs().flatten()
            assert (a - b).abs().max() > 0.1, (i, j)
            assert torch.corrcoef(torch.stack([a, b]))[0, 1] < 0.9, (i, j)  # not the same lines, nor shifted
            assert not torch.equal(splits[i].diffraction, splits[j].diffraction)


def test_a_run_validates_on_the_validation_object_and_reports_the_test_object(tmp_path):
    args = parse_args(["--smoke", "--arms", "hybrid"])
    (tmp_path / "runs").mkdir()
    r = run_one(Job("A", "hybrid", 0, args.levels), args, tmp_path, torch.device("cpu"))
    # rebuild the trained model and the run's three objects; score it on each
    probe = make_probe(args.patch)
    splits = simulate_splits(args.size, args.patch, args.stride, probe, args.nphotons,
                             generator=torch.Generator().manual_seed(0))
    rms = float(splits.train.diffraction.square().mean().sqrt())
    model = PtychoNet(resolve_arm("hybrid").block, args.hidden, args.levels, args.modes, input_scale=rms)
    model.load_state_dict(load_file(str(tmp_path / "runs" / "hybrid_seed0_model.safetensors")))
    scale = loss_scale(splits.train, args.loss)
    val, test = (evaluate(model, s, probe, loss=args.loss, scale=scale, precision="fp32") for s in splits[1:])
    assert r["final_val"] == pytest.approx(val.loss, rel=1e-6) and r["curve"][-1]["amp_cv"] == pytest.approx(val.amp_cv)
    assert r["test_loss"] == pytest.approx(test.loss, rel=1e-6)
    assert abs(val.loss - test.loss) > 1e-3 * test.loss  # different objects give different losses
    assert r["amp_ssim"] == pytest.approx(score_reconstruction(test, splits.test)[0]["amp_ssim"], rel=1e-6)


# --- the failure rule, its positive control, time to failure ------------------------------------------


def curve(vals, cvs=None, steps_per_epoch=10, train=None):
    cvs = cvs or [0.5] * len(vals)
    train = train or [1.0] * len(vals)
    return [dict(step=steps_per_epoch * (k + 1), train_loss=t, val_loss=v, amp_cv=c)
            for k, (v, c, t) in enumerate(zip(vals, cvs, train))]


def test_time_to_failure_is_the_first_evaluation_at_which_the_rule_fires_on_the_run_so_far():
    assert first_failure(curve([1.0, 0.5, 0.4, 0.3])) is None
    # collapse at the 3rd evaluation, even though the run recovers before its end
    assert first_failure(curve([1.0, 0.5, 0.4, 0.3], cvs=[0.5, 0.5, 1e-4, 0.5])) == (30, "collapsed")
    # 0.1 best so far, then 0.2 (not > 3x), 0.35 (> 3x 0.1): the best of the prefix, not of the whole run
    assert first_failure(curve([0.5, 0.1, 0.2, 0.35, 0.05])) == (40, "diverged")
    assert first_failure(curve([0.5, 0.4, 0.7, 1.3])) == (40, "diverged")  # 1.3 > 3 x 0.4; 0.7 is not
    # a non-finite loss is dated by the optimizer step, when known
    nan = curve([0.5, 0.4, math.nan], train=[1.0, 1.0, math.nan])
    assert first_failure(nan) == (30, "non-finite") and first_failure(nan, nonfinite_step=23) == (23, "non-finite")
    # stalled: ending no lower than before the first step (a frozen output), dated at the first such evaluation
    assert first_failure(curve([0.8, 0.7, 0.9]), init_val=1.0) is None
    assert first_failure(curve([0.8, 1.0, 0.9, 1.2]), init_val=1.0) == (20, "stalled")
    assert first_failure(curve([0.8, 1.0, 0.9, 1.2])) is None  # without init_val the rule has no such kind
    # consistent with the end-of-run rule: a run it fails has a first failure at or before its last evaluation
    c = curve([0.5, 0.1, 2.0])
    assert classify_failure(True, 0.1, 2.0, 0.5) == "diverged" and first_failure(c)[0] <= c[-1]["step"]


@pytest.fixture(scope="module")
def positive_control(tmp_path_factory):
    """The positive control (hybrid, no clip, 100x lr) at smoke sizes with 4 px scan steps (13 steps an epoch)."""
    out = tmp_path_factory.mktemp("fno_positive")
    (out / "runs").mkdir()
    args = parse_args(["--smoke", "--stride", "4", "--arms", "hybrid_lr100"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [run_one(Job("A", "hybrid_lr100", s, args.levels), args, out, torch.device("cpu")) for s in range(3)]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # three small training runs
def test_the_positive_control_fires_the_failure_rule(positive_control):
    assert resolve_arm("hybrid_lr100").lr_scale == 100 and resolve_arm("hybrid_lr100").clip is None
    for r in positive_control:
        # 100x the lr of the unscaled schedule: 2 epochs of 13 steps, 1 warmup step, 1% floor
        assert r["peak_lr"] == pytest.approx(0.1)
        for c in r["curve"]:  # the lr of the epoch's last step (read before it, at step - 1)
            assert c["lr"] == pytest.approx(warmup_cosine(c["step"] - 1, 26, 1, 0.1, min_lr=1e-3))
        assert r["failure"] is not None, (r["seed"], r["curve"])
        # its time to failure: an evaluation step within the run, the one first_failure finds on its curve
        steps = [c["step"] for c in r["curve"]]
        first = first_failure(r["curve"], init_val=r["init_val"])
        assert r["failure_step"] in steps and (r["failure_step"], r["first_failure"]) == first
    row = summarize(positive_control, ["hybrid_lr100"])["hybrid_lr100"]
    assert row["failures"] == 3 and row["failure_steps"] == sorted(r["failure_step"] for r in positive_control)
    assert math.isnan(row["best_val"]["median"])  # medians only over successful runs: none
    text = io.StringIO()
    print_table({"hybrid_lr100": row}, file=text)
    line = text.getvalue().splitlines()[2]
    assert line.startswith("hybrid_lr100") and "3/3" in line
    assert line.endswith(", ".join(f"{r['failure_step']} {r['failure']}" for r in
                                   sorted(positive_control, key=lambda r: (r["failure_step"], r["failure"]))))


# --- the clip sweep, the constant-lr regime, the seed-scale preset --------------------------------------


def test_the_clip_sweep_adds_the_control_at_each_clip_and_reuses_an_arm_that_already_trains_it():
    args = parse_args(["--arms", "hybrid,hybrid_clip,stable_layerscale", "--clip-sweep", "1,5,10,20,50,100"])
    assert args.arm_list == ["hybrid", "hybrid_clip", "stable_layerscale", "hybrid_clip5", "hybrid_clip10",
                             "hybrid_clip20", "hybrid_clip50", "hybrid_clip100"]
    assert args.sweep == {1.0: "hybrid_clip", 5.0: "hybrid_clip5", 10.0: "hybrid_clip10", 20.0: "hybrid_clip20",
                          50.0: "hybrid_clip50", 100.0: "hybrid_clip100"}
    for name, value in args.sweep.items():
        arm = resolve_arm(value)
        assert (arm.clip, arm.clip_value, arm.lr_scale, arm.block) == ("norm", name, 1.0, resolve_arm("hybrid").block)
    assert "hybrid_lr100" in parse_args([]).arm_list  # the positive control is a default arm
    for bad in (["--clip-sweep", "0"], ["--clip-sweep", "x"], ["--arms", "hybrid_clip-1"], ["--arms", "nope"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    rows = summarize([], ["hybrid", "hybrid_clip", "hybrid_clip5"])
    out = io.StringIO()
    print_clip_sweep(rows, {1.0: "hybrid_clip", 5.0: "hybrid_clip5"}, file=out)
    text = out.getvalue()
    assert "none (hybrid)" in text and "1 (hybrid_clip)" in text and "5 (hybrid_clip5)" in text


@pytest.mark.slow  # three small training runs
def test_the_sweep_s_clip_value_reaches_the_optimizer_step(tmp_path):
    args = parse_args(["--smoke", "--arms", "hybrid"])
    (tmp_path / "runs").mkdir()
    final = {}
    for arm in ("hybrid", "hybrid_clip1e-05", "hybrid_clip1000"):
        r = run_one(Job("A", arm, 0, args.levels), args, tmp_path, torch.device("cpu"))
        final[arm] = load_file(str(tmp_path / "runs" / f"{arm}_seed0_model.safetensors"))
        assert r["grad_norm"]["max"] < 1000  # so a clip of 1000 never acts
    for key, value in final["hybrid"].items():
        torch.testing.assert_close(final["hybrid_clip1000"][key], value, rtol=0, atol=0)
    assert any(not torch.equal(final["hybrid_clip1e-05"][k], v) for k, v in final["hybrid"].items())


def test_the_constant_schedule_is_a_flat_lr_without_warmup(tmp_path):
    assert parse_args([]).warmup == 0.05 and parse_args(["--schedule", "constant"]).warmup == 0.0
    assert parse_args(["--schedule", "constant", "--warmup", "0.1"]).warmup == 0.1
    args = parse_args(["--smoke", "--arms", "hybrid", "--schedule", "constant", "--lr", "3e-3"])
    (tmp_path / "runs").mkdir()
    r = run_one(Job("A", "hybrid", 0, args.levels), args, tmp_path, torch.device("cpu"))
    assert [c["lr"] for c in r["curve"]] == [3e-3] * args.epochs and r["schedule"] == "constant"
    cosine = parse_args(["--smoke", "--arms", "hybrid", "--lr", "3e-3"])
    r = run_one(Job("A", "hybrid", 0, cosine.levels), cosine, tmp_path, torch.device("cpu"))
    assert r["curve"][-1]["lr"] < 3e-3


def test_seed_scale_is_the_original_geometry():
    args = parse_args(["--seed-scale"])
    assert (args.size, args.patch, args.hidden, args.levels, args.modes, args.seeds, args.epochs) == \
        (392, 64, 32, 4, 12, 5, 20)
    assert args.stage_b == [6] and 8 in args.stage_b_infeasible  # the plan's 6 and 8; 8 cannot hold 64 px
    assert parse_args(["--seed-scale", "--seeds", "10"]).seeds == 10  # explicit flags still win
    with pytest.raises(SystemExit):
        parse_args(["--seed-scale", "--smoke"])



def sbatch_command_line(tmp_path, **env) -> list[str]:
    """The fno_shootout.py flags examples/slurm/fno_seed_scale.sbatch would start (PYTHON=echo, srun runs it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "echo", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SLURM / "fno_seed_scale.sbatch")], capture_output=True, text=True, env=full,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.strip().splitlines()[-1].split()
    assert argv[:2] == ["-m", "torch.distributed.run"] and "--nproc_per_node=4" in argv
    return argv[argv.index("examples/fno_shootout.py") + 1:]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_seed_scale_sbatch_runs_the_preset_with_the_clip_sweep(tmp_path):
    args = parse_args(sbatch_command_line(tmp_path))
    assert args.seed_scale and (args.patch, args.hidden, args.seeds) == (64, 32, 5)
    assert sorted(args.sweep) == [1, 5, 10, 20, 50, 100] and args.schedule == "cosine"
    args = parse_args(sbatch_command_line(tmp_path, SCHEDULE="constant", SEEDS="10", CLIP_SWEEP="", RESUME="auto"))
    assert (args.schedule, args.seeds, args.sweep, args.resume) == ("constant", 10, {}, "auto")
