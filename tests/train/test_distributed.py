"""Cross-rank behaviour: setup from torchrun's env, collectives, DDP and FSDP2 + accumulation
equivalence, no_sync really skipping the all-reduce (and FSDP2's reduce-scatter), early stopping
and NaN skipping agreed across ranks.

All two-process scenarios run in ONE `torchrun --standalone --nproc_per_node=2` launch of this
very file (see `_worker`); the tests below only check what the ranks wrote.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from blockyard.train import (
    DistInfo,
    EarlyStopping,
    GradientAccumulator,
    NonFiniteGuard,
    all_ranks,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    is_distributed,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_ddp,
)

WORLD, K, NUM_BATCHES, EPOCHS, MICRO = 2, 2, 5, 2, 3  # 5 micro-batches, k=2 -> groups 2, 2, 1
LAUNCH_TIMEOUT_S = 120


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Global micro-batches: (EPOCHS, NUM_BATCHES, WORLD * MICRO, features); rank r takes its rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(EPOCHS, NUM_BATCHES, WORLD * MICRO, 4, generator=g)
    y = torch.randn(EPOCHS, NUM_BATCHES, WORLD * MICRO, 1, generator=g)
    return x, y


# ------------------------------------------------------------------------------------------------
# The worker: runs on every rank under torchrun.


def _ddp_accumulation(info: DistInfo) -> dict:
    model = wrap_ddp(make_model(), info)
    calls = [0]

    def counting_allreduce(state, bucket):
        calls[0] += 1
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / dist.get_world_size())

    model.register_comm_hook(None, counting_allreduce)
    opt = make_optimizer(model)
    acc = GradientAccumulator(K, num_batches=NUM_BATCHES)
    x, y = make_data()
    rows = slice(info.rank * MICRO, (info.rank + 1) * MICRO)
    per_micro_batch, steps = [], 0
    for epoch in range(EPOCHS):
        for i in range(NUM_BATCHES):
            before = calls[0]
            with acc.sync_context(model, i) as mb:
                acc.backward(F.mse_loss(model(x[epoch, i, rows]), y[epoch, i, rows]))
            per_micro_batch.append((mb.step, calls[0] - before))
            if mb.step:
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
    # Control: the same model without sync_context all-reduces on every micro-batch.
    before = calls[0]
    for i in range(2):
        F.mse_loss(model(x[0, i, rows]), y[0, i, rows]).backward()
    opt.zero_grad(set_to_none=True)
    return {
        "params": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
        "per_micro_batch": per_micro_batch,
        "steps": steps,
        "control_calls": calls[0] - before,
        "device_ids": model.device_ids,
        "unwrap_ok": unwrap(model) is model.module,
    }


def _fsdp2_accumulation(info: DistInfo) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    opt = make_optimizer(model)
    acc = GradientAccumulator(K, num_batches=NUM_BATCHES)
    x, y = make_data()
    rows = slice(info.rank * MICRO, (info.rank + 1) * MICRO)
    grads_after = []  # sharded grads exist only after a reduce-scatter
    for epoch in range(EPOCHS):
        for i in range(NUM_BATCHES):
            with acc.sync_context(model, i) as mb:
                acc.backward(F.mse_loss(model(x[epoch, i, rows]), y[epoch, i, rows]))
            grads_after.append((mb.step, all(p.grad is not None for p in model.parameters())))
            if mb.step:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {"params": {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()},
            "grads_after": grads_after}


def _early_stopping(info: DistInfo) -> dict:
    # Rank 0 stops improving after check 2 and runs out of patience (2) at check 4; rank 1 improves
    # forever and would never stop on its own.
    rank0 = [1.0, 0.9, 0.95, 0.96] + [0.97] * 20
    rank1 = [1.0 / (t + 1) for t in range(24)]
    es = EarlyStopping(patience=2)
    stopped_at = None
    for check, metric in enumerate(rank0 if info.rank == 0 else rank1, start=1):
        if es.step(metric):
            stopped_at = check
            break
    alive = all_reduce_sum(1.0)  # both ranks must reach this collective, or the launch times out
    return {"stopped_at": stopped_at, "num_bad": es.num_bad, "alive": alive}


def _nan_skip(info: DistInfo) -> dict:
    model = wrap_ddp(make_model(), info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(max_consecutive=3)
    x, y = make_data()
    rows = slice(info.rank * MICRO, (info.rank + 1) * MICRO)
    skips, snapshots = [], []
    for step in range(4):
        xb = x[0, step, rows].clone()
        if step == 2 and info.rank == 1:
            xb[0, 0] = float("nan")
        loss = F.mse_loss(model(xb), y[0, step, rows])
        loss.backward()
        skip = guard.should_skip(loss, model.parameters())
        skips.append(skip)
        if not skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
        snapshots.append(torch.cat([p.detach().flatten() for p in model.parameters()]))

    # Loss-only checks isolate the cross-rank agreement (no DDP all-reduce spreads the NaN here).
    loss_only = NonFiniteGuard(max_consecutive=3)
    nan_on_rank1 = torch.tensor(float("nan") if info.rank == 1 else 1.0)
    agreed = [loss_only.should_skip(nan_on_rank1), loss_only.should_skip(torch.tensor(1.0))]
    abort_at, message = None, ""
    for t in range(10):
        try:
            loss_only.should_skip(nan_on_rank1)
        except RuntimeError as err:
            abort_at, message = t, str(err)
            break
    alive = all_reduce_sum(1.0)
    return {"skips": skips, "snapshots": torch.stack(snapshots), "agreed": agreed,
            "abort_at": abort_at, "message": message, "alive": alive}


def _worker(out_dir: Path) -> None:
    info = setup_distributed(timeout=60)
    result = {
        "info": (info.rank, info.local_rank, info.world_size, str(info.device), info.is_main),
        "env_rank": int(os.environ["RANK"]),
        "mean_float": all_reduce_mean(float(info.rank + 1)),
        "mean_int_tensor": all_reduce_mean(torch.tensor([info.rank, 3 * info.rank])),
        "sum_tensor": all_reduce_sum(torch.tensor([info.rank + 1.0, 10.0])),
        "any": [any_rank(info.rank == 1), any_rank(False), any_rank(torch.tensor(info.rank == 0))],
        "all": [all_ranks(info.rank == 1), all_ranks(True)],
    }
    barrier()
    result["ddp"] = _ddp_accumulation(info)
    result["fsdp2"] = _fsdp2_accumulation(info)
    result["early_stopping"] = _early_stopping(info)
    result["nan"] = _nan_skip(info)
    barrier()
    teardown_distributed()
    result["torn_down"] = not is_distributed()
    torch.save(result, out_dir / f"rank{info.rank}.pt")


# ------------------------------------------------------------------------------------------------
# The launch (once per module) and the tests.


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           __file__, str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: a hang must fail, not block
        output, _ = proc.communicate()
        pytest.fail(f"2-process run hung for {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"2-process run failed ({proc.returncode}):\n{output[-4000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process_reference() -> dict[str, torch.Tensor]:
    """One process, one optimizer step per group on the concatenated global batch."""
    model = make_model()
    opt = make_optimizer(model)
    x, y = make_data()
    for epoch in range(EPOCHS):
        for start in range(0, NUM_BATCHES, K):
            xb = x[epoch, start:start + K].reshape(-1, 4)
            yb = y[epoch, start:start + K].reshape(-1, 1)
            F.mse_loss(model(xb), yb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.distributed
def test_setup_from_torchrun_env_and_collectives(ranks):
    for r, res in enumerate(ranks):
        assert res["info"] == (r, r, WORLD, "cpu", r == 0)
        assert res["env_rank"] == r
        assert res["mean_float"] == 1.5
        torch.testing.assert_close(res["mean_int_tensor"], torch.tensor([0.5, 1.5], dtype=torch.float64))
        torch.testing.assert_close(res["sum_tensor"], torch.tensor([3.0, 20.0]))
        assert res["any"] == [True, False, True]
        assert res["all"] == [False, True]
        assert res["torn_down"]
        assert res["ddp"]["device_ids"] is None  # CPU modules must not get device_ids
        assert res["ddp"]["unwrap_ok"]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_accumulation_matches_single_process_global_batch(ranks):
    reference = single_process_reference()
    assert ranks[0]["ddp"]["steps"] == EPOCHS * 3
    for res in ranks:
        params = res["ddp"]["params"]
        assert params.keys() == reference.keys()
        for name, ref in reference.items():
            torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-6, msg=name)
    for name in reference:  # replicas are bitwise equal
        assert torch.equal(ranks[0]["ddp"]["params"][name], ranks[1]["ddp"]["params"][name])
    # The reference really moved away from the start (the comparison is not vacuous).
    start = make_model().state_dict()
    assert max((reference[n] - start[n]).abs().max().item() for n in start) > 0.05


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_accumulation_matches_single_process_and_skips_reduce_scatter(ranks):
    reference = single_process_reference()
    for res in ranks:
        for name, ref in reference.items():
            torch.testing.assert_close(res["fsdp2"]["params"][name], ref, rtol=0, atol=1e-6, msg=name)
        # non-stepping micro-batches leave the sharded grads unset: no reduce-scatter ran
        assert res["fsdp2"]["grads_after"] == [(s, s) for s in [False, True, False, True, True] * EPOCHS]


@pytest.mark.slow
@pytest.mark.distributed
def test_no_sync_skips_allreduce_on_non_stepping_micro_batches(ranks):
    for res in ranks:
        per_mb = res["ddp"]["per_micro_batch"]
        assert [s for s, _ in per_mb] == [False, True, False, True, True] * EPOCHS
        synced = [c for s, c in per_mb if s]
        assert all(c == 0 for s, c in per_mb if not s)
        assert min(synced) >= 1 and len(set(synced)) == 1  # every stepping micro-batch: all buckets
        assert res["ddp"]["control_calls"] == 2 * synced[0]  # without no_sync: every backward syncs


@pytest.mark.slow
@pytest.mark.distributed
def test_early_stop_on_one_rank_stops_both_without_hang(ranks):
    for res in ranks:
        assert res["early_stopping"]["stopped_at"] == 4
        assert res["early_stopping"]["alive"] == 2.0
    assert ranks[1]["early_stopping"]["num_bad"] == 0  # rank 1 alone would have gone on


@pytest.mark.slow
@pytest.mark.distributed
def test_nan_on_one_rank_skips_step_on_both(ranks):
    for res in ranks:
        assert res["nan"]["skips"] == [False, False, True, False]
        snaps = res["nan"]["snapshots"]
        assert torch.equal(snaps[2], snaps[1])  # the skipped step changed nothing
        assert not torch.equal(snaps[3], snaps[2])  # training went on afterwards
        assert torch.isfinite(snaps).all()
        assert res["nan"]["agreed"] == [True, False]
        assert res["nan"]["abort_at"] == 2  # third NaN in a row aborts, on both ranks at once
        assert "3 consecutive steps" in res["nan"]["message"]
        assert res["nan"]["alive"] == 2.0
    assert torch.equal(ranks[0]["nan"]["snapshots"], ranks[1]["nan"]["snapshots"])
    assert "on another rank" in ranks[0]["nan"]["message"]


# ------------------------------------------------------------------------------------------------
# Single-process behaviour (no launch).


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_plain_python_runs_alone_without_process_group(no_torchrun_env):
    info = setup_distributed()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 1, True)
    assert not is_distributed()
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model
    assert all_reduce_mean(2.5) == 2.5 and all_reduce_sum(4.0) == 4.0
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_mean(t), t)
    assert any_rank(True) and not any_rank(torch.tensor(False)) and all_ranks(True)
    barrier()
    teardown_distributed()  # nothing to tear down: no error
    assert setup_distributed(device="cpu").device == torch.device("cpu")


def test_srun_without_torchrun_warns(no_torchrun_env, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with caplog.at_level("WARNING", logger="blockyard.train.distributed"):
        assert setup_distributed(device="cpu").world_size == 1
    assert "srun torchrun" in caplog.text


def test_incomplete_torchrun_env_is_rejected(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        setup_distributed()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        setup_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="RANK"):
        setup_distributed()


@pytest.mark.distributed
def test_existing_group_is_reused_and_ddp_on_cpu_has_no_device_ids(world_of_one, no_torchrun_env):
    info = setup_distributed()
    assert info.world_size == 1 and is_distributed()
    model = nn.Linear(3, 2)
    ddp = wrap_ddp(model, info)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel) and ddp.device_ids is None
    assert unwrap(ddp) is model
    assert unwrap(torch.compile(ddp)) is model
    assert unwrap(nn.parallel.DistributedDataParallel(torch.compile(model))) is model
    assert any_rank(torch.tensor(True)) and not all_ranks(False)
    assert all_reduce_sum(torch.tensor([2, 3])).tolist() == [2, 3]
    with pytest.raises(ValueError, match="flag: expected a single-element tensor"):
        any_rank(torch.tensor([True, False]))
    teardown_distributed()
    assert not is_distributed()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
