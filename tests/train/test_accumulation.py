import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from blockyard.train import GradientAccumulator, MicroBatch, make_grad_scaler

MICRO = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def make_data(num_batches: int):
    g = torch.Generator().manual_seed(2)
    return torch.randn(num_batches, MICRO, 3, generator=g), torch.randn(num_batches, MICRO, 2, generator=g)


def expected_plan(k: int, n: int) -> list[MicroBatch]:
    """Independent listing: cut range(n) into consecutive chunks of k; the last one may be short."""
    plan = []
    for start in range(0, n, k):
        group = list(range(start, min(start + k, n)))
        plan += [MicroBatch(i, i == group[-1], len(group), pos) for pos, i in enumerate(group)]
    return plan


@pytest.mark.parametrize(("k", "n"), [(1, 3), (3, 7), (3, 8), (4, 4), (5, 3), (3, 9)])
def test_plan_matches_independent_listing(k, n):
    acc = GradientAccumulator(k, num_batches=n)
    assert [acc.plan(i) for i in range(n)] == expected_plan(k, n)
    assert acc.steps_per_epoch() == sum(mb.step for mb in expected_plan(k, n))


def test_endless_stream_steps_every_k_and_num_batches_per_call_overrides():
    acc = GradientAccumulator(3)
    assert [acc.should_step(i) for i in range(7)] == [False, False, True, False, False, True, False]
    assert {acc.plan(i).group_size for i in range(7)} == {3}
    assert acc.plan(6, num_batches=7) == MicroBatch(6, True, 1, 0)
    assert acc.steps_per_epoch(10) == 4


@pytest.mark.parametrize("n", [7, 8, 9])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_one_large_batch_step_per_group(n, optimizer):
    k = 3
    x, y = make_data(n)

    def opt_for(model):
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=0.05)

    model, ref = make_model(), make_model()
    opt, ref_opt = opt_for(model), opt_for(ref)
    acc = GradientAccumulator(k, num_batches=n)
    for _epoch in range(2):
        ref_after = []
        for start in range(0, n, k):  # reference: concatenate the group into one batch
            F.mse_loss(ref(x[start:start + k].flatten(0, 1)), y[start:start + k].flatten(0, 1)).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_after.append([p.detach().clone() for p in ref.parameters()])
        # ... which is only fair if `ref` and `model` start the epoch equal: replay `model` from there.
        steps = 0
        for i in range(n):
            with acc.sync_context(model, i) as mb:
                acc.backward(F.mse_loss(model(x[i]), y[i]))
            if mb.step:
                opt.step()
                opt.zero_grad()
                for p, r in zip(model.parameters(), ref_after[steps]):
                    torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
                steps += 1
        assert steps == len(ref_after) == -(-n // k)


def test_leftover_group_gradient_is_its_mean_not_divided_by_k():
    k, n = 3, 7  # last group holds one micro-batch
    x, y = make_data(n)
    model, ref = make_model(), make_model()
    acc = GradientAccumulator(k, num_batches=n)
    with acc.sync_context(model, 6) as mb:
        acc.backward(F.mse_loss(model(x[6]), y[6]))
    assert mb == MicroBatch(6, True, 1, 0)
    F.mse_loss(ref(x[6]), y[6]).backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-7)
        assert not torch.allclose(p.grad, r.grad / k, atol=1e-6)  # Lightning/accelerate's 1/k is caught


def test_backward_returns_parts_of_group_mean_loss_and_uses_the_scaler():
    k, n = 2, 5
    x, y = make_data(n)
    model, ref = make_model(), make_model()
    acc = GradientAccumulator(k, num_batches=n)
    scaler = make_grad_scaler("fp16", "cpu")
    total = torch.zeros(())
    for i in (2, 3):
        with acc.sync_context(model, i):
            total += acc.backward(F.mse_loss(model(x[i]), y[i]), scaler)
    ref_loss = F.mse_loss(ref(x[2:4].flatten(0, 1)), y[2:4].flatten(0, 1))
    ref_loss.backward()
    torch.testing.assert_close(total, ref_loss.detach())
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad * scaler.get_scale(), rtol=1e-5, atol=1e-3)


class _RecordsNoSync(nn.Linear):
    def __init__(self):
        super().__init__(2, 2)
        self.entered: list[bool] = []
        self.inside = False

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x):
        self.entered.append(self.inside)
        return super().forward(x)


def test_sync_context_wraps_forward_in_no_sync_only_when_not_stepping():
    model = _RecordsNoSync()
    acc = GradientAccumulator(3, num_batches=5)
    for i in range(5):
        with acc.sync_context(model, i):
            acc.backward(model(torch.randn(1, 2)).sum())
    assert model.entered == [True, True, False, True, False]
    assert not model.inside


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sync_context_finds_ddp_under_torch_compile(world_of_one):
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    compiled = torch.compile(ddp)  # never called: only the wrapper matters here
    acc = GradientAccumulator(2, num_batches=3)
    seen = []
    for i in range(3):
        with acc.sync_context(compiled, i):
            seen.append(ddp.require_backward_grad_sync)
    assert seen == [False, True, True]
    assert ddp.require_backward_grad_sync


def test_backward_outside_sync_context_raises():
    acc = GradientAccumulator(2)
    with pytest.raises(RuntimeError, match="sync_context"):
        acc.backward(torch.ones((), requires_grad=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "k: expected"), ({"k": 1.5}, "k: expected"), ({"k": True}, "k: expected"),
     ({"k": 2, "num_batches": 0}, "num_batches: expected")],
)
def test_rejects_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientAccumulator(**kwargs)


def test_rejects_bad_index():
    acc = GradientAccumulator(2, num_batches=4)
    with pytest.raises(ValueError, match="index: expected < num_batches=4, got 4"):
        acc.plan(4)
    with pytest.raises(ValueError, match="index: expected an integer >= 0"):
        acc.plan(-1)
    with pytest.raises(ValueError, match="num_batches: required"):
        GradientAccumulator(2).steps_per_epoch()
