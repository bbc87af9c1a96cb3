"""Stepper: the optimizer-step mechanics equal the hand-written loop, skip what must be skipped, resume exactly."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blockyard.train import EMA, CheckpointManager, Stepper, warmup_cosine


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def data(n_batches: int, rows: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 4, generator=g), torch.randn(rows, 1, generator=g)) for _ in range(n_batches)]


def schedule(step: int) -> float:
    return warmup_cosine(step, total_steps=6, warmup_steps=2, base_lr=0.05, min_lr=0.001)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def reference_run(batches, k: int, clip: float):
    """The loop written out by hand: mean loss over each group of <= k micro-batches, clip, AdamW, lr, EMA."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=schedule(0), weight_decay=0.01)
    ema = EMA(model, decay=0.9)
    step = 0
    for start in range(0, len(batches), k):
        group = batches[start:start + k]
        for x, y in group:
            (loss_of(model, x, y) / len(group)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        for g in opt.param_groups:
            g["lr"] = schedule(step)
        ema.update(model, step)
    return model, ema, step


def stepper_run(batches, k: int, clip: float, **kw):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
    ema = EMA(model, decay=0.9)
    stepper = Stepper(model, opt, accumulate=k, num_batches=len(batches), clip_value=clip, schedule=schedule,
                      ema=ema, **kw)
    for i, (x, y) in enumerate(batches):
        with stepper.micro_batch(i) as mb:
            stepper.backward(loss_of(model, x, y))
        if mb.step:
            assert stepper.step()
    return model, ema, stepper


@pytest.mark.parametrize("k", [1, 3])
def test_equals_the_hand_written_loop_with_leftover_group(k):
    batches = data(7)  # k=3: groups 3, 3, 1 (the last weighted by 1, not 1/3)
    ref_model, ref_ema, ref_steps = reference_run(batches, k, clip=0.05)  # small: clipping is active
    model, ema, stepper = stepper_run(batches, k, clip=0.05)
    assert stepper.steps == ref_steps == math.ceil(7 / k)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ema.module.parameters(), ref_ema.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stepper.lr == schedule(stepper.steps)
    assert stepper.grad_norm is not None and float(stepper.grad_norm) > 0.05  # the pre-clip norm


def test_lr_follows_the_schedule_from_construction():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    Stepper(model, opt, schedule=schedule)
    assert opt.param_groups[0]["lr"] == schedule(0) == 0.0


def test_nonfinite_loss_is_skipped_without_advancing_anything():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    stepper = Stepper(model, opt, schedule=lambda s: 0.1 / (1 + s), ema=ema, max_nonfinite=2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data(1)[0]
    with stepper.micro_batch(0) as mb:
        stepper.backward(loss_of(model, x, y) * float("nan"))
    assert mb.step and not stepper.step()
    assert stepper.steps == 0 and stepper.skipped == 1 and opt.param_groups[0]["lr"] == 0.1
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    with stepper.micro_batch(0):
        stepper.backward(loss_of(model, x, y) * float("inf"))
    with pytest.raises(RuntimeError, match="2 consecutive"):
        stepper.step()


def test_without_the_guard_divergence_shows():
    model = make_model()
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_nonfinite=False, clip=None)
    x, y = data(1)[0]
    with stepper.micro_batch(0):
        stepper.backward(loss_of(model, x, y) * float("nan"))
    assert stepper.step() and stepper.steps == 1
    assert stepper.grad_norm is None
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_uses_a_real_scaler_and_an_overflow_skips_schedule_and_ema():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    stepper = Stepper(model, opt, precision="fp16", device="cpu", schedule=lambda s: 0.1 / (1 + s), ema=ema)
    assert stepper.scaler.is_enabled()
    scale = stepper.scaler.get_scale()
    x, y = data(1)[0]
    with stepper.micro_batch(0):
        stepper.backward(loss_of(model, x, y))
    assert stepper.step() and stepper.steps == 1
    ema_before = [p.detach().clone() for p in ema.module.parameters()]
    with stepper.micro_batch(0):  # a finite loss whose scaled gradient overflows: the scaler's skip
        stepper.backward(loss_of(model, x, y) * 1e35)  # x 65536 overflows float32
    assert not stepper.step()
    assert stepper.steps == 1 and stepper.skipped == 1 and stepper.scaler.get_scale() < scale
    assert opt.param_groups[0]["lr"] == 0.1 / 2
    for a, b in zip(ema.module.parameters(), ema_before):
        assert torch.equal(a, b)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    batches = data(6)
    full_model, _, full = stepper_run(batches, k=2, clip=1.0, precision="fp16", device="cpu")

    def make():
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
        ema = EMA(model, decay=0.9)
        return model, opt, ema, Stepper(model, opt, accumulate=2, num_batches=6, clip_value=1.0, schedule=schedule,
                                        ema=ema, precision="fp16", device="cpu")

    model, opt, ema, stepper = make()
    for i, (x, y) in enumerate(batches[:4]):
        with stepper.micro_batch(i) as mb:
            stepper.backward(loss_of(model, x, y))
        if mb.step:
            stepper.step()
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(stepper.steps, {"model": model, "optimizer": opt, "ema": ema, "stepper": stepper})
    model, opt, ema, stepper = make()
    ckpt.load_latest({"model": model, "optimizer": opt, "ema": ema, "stepper": stepper})
    assert stepper.steps == 2 and stepper.lr == schedule(2)
    assert stepper.scaler.get_scale() == full.scaler.get_scale()
    for i, (x, y) in list(enumerate(batches))[4:]:
        with stepper.micro_batch(i) as mb:
            stepper.backward(loss_of(model, x, y))
        if mb.step:
            stepper.step()
    assert stepper.steps == full.steps
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_step_outside_a_stepping_micro_batch_is_an_error():
    model = make_model()
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulate=2, num_batches=4)
    x, y = data(1)[0]
    with stepper.micro_batch(0) as mb:
        stepper.backward(loss_of(model, x, y))
    assert not mb.step
    with pytest.raises(RuntimeError, match="stepping micro-batch"):
        stepper.step()


@pytest.mark.parametrize("kwargs, match", [
    ({"clip": "l2"}, "clip: expected"),
    ({"clip_value": 0.0}, "clip_value: expected"),
    ({"schedule": 0.1}, "schedule: expected a callable"),
    ({"precision": "fp8"}, "precision: expected"),
    ({"accumulate": 0}, "k: expected"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match=match):
        Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="optimizer: expected"):
        Stepper(model, object())


@pytest.mark.parametrize("clip", ["norm", "value", None])
def test_a_nonfinite_gradient_under_a_finite_loss_is_skipped(clip):
    """The guard reads the norm that norm clipping measured, or the gradients themselves otherwise."""
    model = make_model()
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), clip=clip)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data(1)[0]
    handle = model[0].weight.register_hook(lambda g: g * float("inf"))
    with stepper.micro_batch(0):
        stepper.backward(loss_of(model, x, y))
    handle.remove()
    assert not stepper.step() and stepper.skipped == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_precomputed_norm_clips_exactly_like_measuring_it():
    from blockyard.train import clip_gradients, grad_norm

    grads = []
    for precomputed in (False, True):
        model = make_model()
        x, y = data(1)[0]
        loss_of(model, x, y).backward()
        norm = grad_norm(model.parameters()) if precomputed else None
        total = clip_gradients(model.parameters(), "norm", 0.01, norm=norm)
        grads.append(([p.grad.clone() for p in model.parameters()], total))
    assert torch.equal(grads[0][1], grads[1][1])
    for a, b in zip(grads[0][0], grads[1][0]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="norm: a precomputed norm applies to algorithm='norm' only"):
        clip_gradients(model.parameters(), "value", 1.0, norm=grads[0][1])
