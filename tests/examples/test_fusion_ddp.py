"""FusionNet model and the fusion_ddp.py training script: shapes, FiLM identity, DDP smoke, exact resume."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fusion import build_data
from fusion.batches import FusionSamples, model_inputs
from fusion.encoding import HISTORY, IN_CHANNELS
from fusion.model import N_ACTIONS, FusionNet

from blockyard.data import BucketBatchSampler, GroupedStore
from blockyard.losses import neighborhood_cross_entropy, wta_heatmap_loss
from blockyard.train import read_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fusion_ddp.py"
TIMEOUT = 150


pytestmark = pytest.mark.usefixtures("one_thread")


def random_inputs(batch: int, height: int, width: int, history_len: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, IN_CHANNELS, height, width, generator=g)
    history = torch.stack([torch.randint(0, N_ACTIONS, (batch, HISTORY), generator=g).float(),
                           torch.randint(0, height, (batch, HISTORY), generator=g).float(),
                           torch.randint(0, width, (batch, HISTORY), generator=g).float(),
                           torch.randint(0, 60, (batch, HISTORY), generator=g).float(),
                           torch.randint(0, 60, (batch, HISTORY), generator=g).float()], -1)
    return x, history, torch.tensor(history_len), torch.full((batch,), 60)


@pytest.mark.parametrize("size", [16, 32])
def test_forward_backward_k4(size):
    torch.manual_seed(0)
    net = FusionNet(widths=(8, 16, 16, 16), hypotheses=4, rnn_hidden=16)
    x, history, length, initial = random_inputs(2, size, size, [0, 5])
    out = net(x, history, length, initial)
    assert out.position.shape == (2, 4, size, size)
    assert out.action.shape == (2, N_ACTIONS, size, size)
    centers = torch.tensor([[3, 4], [size - 3, size - 2]])
    wta = wta_heatmap_loss(out.position, centers)
    loss = 5 * wta.loss + neighborhood_cross_entropy(out.action, centers, torch.tensor([1, 7])) + 0.5 * wta.diversity
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the heads and the (zero-initialised) FiLM projections learn from the first step
    film = [p.grad for n, p in net.named_parameters() if ".film." in n]
    assert len(film) == 3 and all(g.abs().sum() > 0 for g in film)
    assert net.position_head.out.weight.grad.abs().sum() > 0
    assert net.action_head.out.weight.grad.abs().sum() > 0


def test_film_is_identity_for_an_empty_history_even_after_training():
    torch.manual_seed(0)
    net = FusionNet(widths=(8, 16, 16, 16), hypotheses=4, rnn_hidden=16).eval()
    with torch.no_grad():  # as if trained: FiLM projections and GRU far from their init
        for name, p in net.named_parameters():
            if ".film." in name or name.startswith("history."):
                p.normal_(0, 0.5)
    x, history_a, _, initial = random_inputs(3, 16, 24, [0, 0, 0], seed=1)
    _, history_b, _, _ = random_inputs(3, 16, 24, [0, 0, 0], seed=2)
    empty = torch.zeros(3, dtype=torch.long)
    a = net(x, history_a, empty, initial)
    b = net(x, history_b, empty, initial)
    torch.testing.assert_close(a.position, b.position, rtol=0, atol=0)
    torch.testing.assert_close(a.action, b.action, rtol=0, atol=0)
    full = torch.full((3,), 7)  # the same contents do change the output once they count
    assert not torch.allclose(net(x, history_a, full, initial).position, net(x, history_b, full, initial).position)


# --- the training script ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    return build_data.ensure_dataset(tmp_path_factory.mktemp("fusion") / "data", smoke=True, workers=2)


def run_script(out: Path, data: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(SCRIPT), "--smoke", "--out", str(out), "--data", str(data), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_run(smoke_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, run_script(out, smoke_data)


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]  # wall-clock timings differ


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_smoke_run(ddp_run, smoke_data):
    out, proc = ddp_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    val_size = len(GroupedStore(smoke_data / "val", verify=False))
    for r in records:  # validation summed over both ranks: every val sample exactly once
        assert r["n"] == val_size
        assert all(math.isfinite(r[k]) for k in ("train_loss", "loss", "pos", "act", "div"))
        assert 0.0 <= r["pos_acc_top1"] <= r["pos_acc_top5"] <= 1.0
        assert r["pos_acc_top1"] <= r["oracle_acc_top1"] + 1e-12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [c["stage"] for c in summary["criteria"]] == [1, 2, 3, 4]
    assert {"setting1", "setting2", "overall"} <= set(summary["inference"])
    assert "stage 1 [" in proc.stdout and "Setting 1" in proc.stdout
    assert (out / "checkpoints" / "config.json").exists()
    assert (out / "curves.png").stat().st_size > 0 and (out / "heatmaps.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_interrupted_run_resumes_exactly(ddp_run, smoke_data, tmp_path):
    reference = read_metrics(ddp_run[0] / "metrics.jsonl")
    run_script(tmp_path, smoke_data, "--stop-after", "1")  # as if killed after epoch 1's checkpoint
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    proc = run_script(tmp_path, smoke_data, "--resume", "auto")
    assert "resumed from" in proc.stdout
    resumed = read_metrics(tmp_path / "metrics.jsonl")
    assert comparable(resumed) == comparable(reference)


def test_flips_are_a_function_of_seed_epoch_and_index(smoke_data):
    store = GroupedStore(smoke_data / "train", verify=False)
    a, b = FusionSamples(store, augment=True, seed=3), FusionSamples(store, augment=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(5)
    b.set_epoch(2)
    batch = next(iter(BucketBatchSampler(store, 8, seed=0)))
    for x, y in zip(a.__getitems__(batch), b.__getitems__(batch)):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a.flips.any() and not a.flips.all()
    plain = FusionSamples(store).__getitems__(batch)
    flipped = a.__getitems__(batch)
    assert not torch.equal(plain.state, flipped.state)
    inputs = model_inputs(flipped)  # a flipped target is still a legal anchor of the flipped state
    rows = torch.arange(len(batch))
    assert not inputs.mask[rows, inputs.centers[:, 0], inputs.centers[:, 1]].any()
