"""m-height example: the models assembled from blocks, and the training script end to end."""
from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import run_contract as contract
import torch
from gradients import leave_identity_init, without_gradient
from mheight.heights import NK, mheights
from mheight.models import FAMILIES, MoE, augment, build_model, encode
from torchrun_helpers import read_metrics, run_example

from blockyard.data import ShardDataset
from blockyard.train import CheckpointManager

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "mheight_moe.py"
TIMEOUT = 300


def batch(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(9, 4, 2), (10, 6, 4), (9, 5, 3), (10, 4, 6), (9, 6, 3)]
    side = torch.tensor([shapes[i % len(shapes)] for i in range(b)], dtype=torch.float32)
    matrix = torch.zeros(b, 6, 6)
    for i, (n, k, _) in enumerate(side.long().tolist()):
        matrix[i, :k, : n - k] = torch.rand(k, n - k, generator=g) * 200 - 100
    return encode(matrix, side)


@pytest.mark.parametrize("name", FAMILIES)
def test_models_map_p_and_side_to_one_value_per_row_and_every_used_parameter_gets_a_gradient(name, one_thread):
    """Off the identity-at-init state (the ViT's zero-init branch outputs block the gradient upstream of them on
    step one), every parameter gets a gradient, except exactly those of the MoE experts that the top-2 gate
    selected for no row of the batch: only selected experts run."""
    torch.manual_seed(0)
    net = build_model(name, base_channels=8, num_blocks=1)
    leave_identity_init(net)
    x, side, key = batch()
    out = net(x, side, key)
    assert out.value.shape == (5,) and out.aux_loss.shape == ()
    (out.value.square().mean() + out.aux_loss).backward()
    idle = set()
    if name == "moe":
        weights = net.route(side, key)
        unused = [e for e in range(weights.shape[1]) if not weights[:, e].any()]
        assert unused, weights  # this batch leaves an expert out, so the exception is exercised
        prefixes = tuple(f"moe.experts.{e}." for e in unused)
        idle = {n for n, _ in net.named_parameters() if n.startswith(prefixes)}
        assert len(idle) == 15 * len(unused)  # every parameter of an unselected expert
    assert without_gradient(net) == idle
    net.eval()
    other = side.clone()
    other[:, 2] += 1.0  # a different m for the same code: the side parameters are used
    assert not torch.allclose(net(x, side, key).value, net(x, other, key).value)


def test_encode_scales_p_and_centres_the_side():
    matrix = torch.full((2, 6, 6), 100.0)
    side = torch.tensor([[9.0, 4.0, 2.0], [10.0, 6.0, 6.0]])
    matrix[1, 4:] = 0.0  # padding rows
    matrix[0, 0, 0] = -100.0
    x, s, key = encode(matrix, side)
    assert x.shape == (2, 2, 6, 6) and key.tolist() == [0, 5]  # NK.index((9, 4)), NK.index((10, 6))
    assert x[0, 0, 0, 0] == -1.0 and torch.all(x[0, 0].flatten()[1:] == 1.0)
    torch.testing.assert_close(x[0, 1], torch.full((6, 6), math.log2(100.0) / 7))  # sign-free log magnitude
    assert torch.all(x[1, :, 4:] == 0)  # padding stays 0 in both channels
    torch.testing.assert_close(s, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="matrix, side: expected"):
        encode(torch.zeros(2, 6, 6), torch.zeros(2, 2))


def test_augment_is_a_symmetry_of_every_height_and_keeps_the_padding():
    g = torch.Generator().manual_seed(1)
    for n, k in NK:
        P = torch.rand(6, k, n - k, dtype=torch.float64, generator=g) * 200 - 100
        padded = torch.zeros(6, 6, 6, dtype=torch.float64)
        padded[:, :k, : n - k] = P
        shape = torch.tensor([[k, n - k]] * 6)
        out = augment(padded, shape, torch.Generator().manual_seed(n * k))
        assert torch.all(out[:, k:] == 0) and torch.all(out[:, :, n - k:] == 0)
        assert not torch.equal(out, padded)  # it does move entries
        torch.testing.assert_close(mheights(out[:, :k, : n - k]), mheights(P), rtol=1e-9, atol=0)
        again = augment(padded, shape, torch.Generator().manual_seed(n * k))
        assert torch.equal(out, again)  # reproducible from the generator (exact resume)
    # a transposition of P is NOT a symmetry in general: the test above would catch a wrong op
    P = torch.rand(1, 4, 5, dtype=torch.float64, generator=g) * 200 - 100
    assert not torch.allclose(mheights(P[:, :, :4]), mheights(P[:, :, :4].transpose(1, 2)))


def test_moe_from_one_backbone_starts_as_that_backbone(one_thread):
    """All experts are copies, gate weights sum to 1: the MoE's output is the backbone's at the start."""
    torch.manual_seed(0)
    resnet = build_model("resnet", base_channels=8, num_blocks=1).eval()
    moe = MoE.from_backbone(resnet.net).eval()
    features = batch(8)
    torch.testing.assert_close(moe(*features).value, resnet(*features).value, rtol=1e-5, atol=1e-5)
    # the experts are independent copies, not shared modules
    experts = moe.moe.experts
    assert experts[0].stem[0].weight.data_ptr() != experts[1].stem[0].weight.data_ptr()


def test_moe_gate_sees_only_n_and_k_and_selects_two_experts(one_thread):
    torch.manual_seed(0)
    moe = build_model("moe", base_channels=8, num_blocks=1).eval()
    _, side, key = batch(6)
    weights = moe.route(side, key)
    assert torch.all((weights > 0).sum(1) == 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    other = side.clone()
    other[:, 2] = 0.7  # m changes, (n, k) does not: same routing
    torch.testing.assert_close(moe.route(other, key), weights)


MODELS_RUN = ("resnet", "moe")  # the default --models
METRICS = [f"{name}/metrics.jsonl" for name in MODELS_RUN]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One finished 2-process smoke run with the default flags, shared by the checks below (each works on a copy)."""
    out = tmp_path_factory.mktemp("mheight") / "run"
    return out, run_example(SCRIPT, out, timeout=TIMEOUT)


@pytest.fixture
def used_out(ddp_run, tmp_path):
    """A copy of the finished run's folder, for a check that launches on it."""
    return Path(shutil.copytree(ddp_run[0], tmp_path / "run"))


def assert_learned(out: Path, data: Path, names) -> None:
    """Every model beats, by 10 % on validation and test, the constant prediction of the training mean of log2 h.

    With the optimizer step made a no-op the smoke models score 0.99-1.09x that predictor; trained, 0.54-0.85x over
    seeds 0-2 (fp16 included). The summary's own "group mean" baseline (0.10-0.15x) is out of reach in 20 steps.
    """
    summary = json.loads((out / "summary.json").read_text())
    for split in ("val", "test"):
        log2h = ShardDataset(data / split).column("target").double().log2()
        constant = float((log2h - summary["log2h"]["mean"]).square().mean())
        for name in names:
            assert summary["results"][name][split]["overall"] < 0.9 * constant, (name, split, constant)


def stepper_state(checkpoints: Path) -> dict:
    """The Stepper's saved state in the newest checkpoint of ``checkpoints``."""

    class Capture:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            self.state = state

    capture = Capture()
    assert CheckpointManager(checkpoints, rng=False).load_latest({"stepper": capture}) is not None, checkpoints
    return capture.state


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_smoke_run_trains_every_model_learns_and_reports_per_group(ddp_run):
    out, proc = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert list(summary["results"]) == ["group mean", *MODELS_RUN]
    for name, result in summary["results"].items():
        for split in ("val", "test"):
            assert result[split]["overall"] >= 0 and len(result[split]["groups"]) == 21, (name, split)
    for name in MODELS_RUN:
        records = read_metrics(out / name / "metrics.jsonl")
        assert [(r["epoch"], r["opt_step"]) for r in records] == [(1, 10), (2, 20)]  # 672 rows / 64 per step
    assert_learned(out, out / "data", MODELS_RUN)
    assert "validation Log2-MSE per group" in proc.stdout and "(10, 6, 4)" in proc.stdout
    assert (out / "groups.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def changed_architecture_is_refused(script: Path, out: Path) -> None:
    contract.check_changed_config_is_refused(script, out, "--channels", "16", key="channels: saved 8, requested 16")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("check", [contract.check_used_out_is_refused, contract.check_damaged_checkpoints_are_refused,
                                   changed_architecture_is_refused, contract.check_overwrite_keeps_the_old_run],
                         ids=["used-out", "damaged-checkpoints", "changed-architecture", "overwrite"])
def test_a_finished_run_folder_is_refused_or_moved_aside(check, used_out):
    check(SCRIPT, used_out)


@pytest.mark.slow
@pytest.mark.distributed
def test_concurrent_runs_and_fp16_trains_every_model_with_a_real_scaler(ddp_run, tmp_path):
    """Two runs at once on one folder: one is refused; the other (fp16, fcn then resnet) trains through a real
    GradScaler: its scale is checkpointed, overflow steps are skipped and counted, and the models learn."""
    out, data = tmp_path / "run", ddp_run[0] / "data"
    contract.check_concurrent_runs(SCRIPT, out, "--precision", "fp16", "--models", "fcn,resnet", "--data", str(data))
    for name in ("fcn", "resnet"):
        stepper = stepper_state(out / name / "checkpoints")
        scale = stepper["scaler"]["scale"]
        assert 0 < scale <= 2.0**16 and math.log2(scale) % 1 == 0, stepper  # a real scaler: a power of two
        assert stepper["steps"] + stepper["skipped"] == 20, stepper  # 10 micro-batches per epoch, 2 epochs
        assert read_metrics(out / name / "metrics.jsonl")[-1]["opt_step"] == stepper["steps"]
    assert_learned(out, data, ("fcn", "resnet"))


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(ddp_run, tmp_path):
    """SIGKILL at optimizer step 35: the MoE's 2nd epoch (steps 21-40; its epoch-1 checkpoint exists), after the
    ResNet (steps 1-20) finished. The resume restores the finished ResNet without retraining it, continues the MoE."""
    out = tmp_path / "run"
    contract.check_sigkill_resume_is_exact(SCRIPT, out, ddp_run[0], METRICS, 35, "--data", str(ddp_run[0] / "data"))
    resumed_at = json.loads((out / "run.json").read_text())["resumed"]
    assert len(resumed_at) == 1, resumed_at
    started = datetime.strptime(resumed_at[0], "%Y-%m-%dT%H-%M-%SZ").replace(tzinfo=timezone.utc).timestamp()
    for manifest in (out / "resnet" / "checkpoints").rglob("manifest.json"):
        assert manifest.stat().st_mtime < started, f"{manifest} was rewritten by the resumed run"
    assert any(p.stat().st_mtime >= started for p in (out / "moe" / "checkpoints").rglob("manifest.json"))
