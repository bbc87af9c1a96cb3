import itertools
import json
import math
import random

import pytest
import torch

from blockyard.train.schedules import Plateau, apply_lr, one_cycle, warmup_cosine


def design_formula(step, total, warmup, base, min_lr):
    """DESIGN.md, written out literally."""
    if step < warmup:
        return base * step / warmup
    if step >= total:
        return min_lr
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_warmup_cosine_known_values():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.1)
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(5, **kw) == 0.5
    assert warmup_cosine(10, **kw) == 1.0  # exactly base at the end of warmup
    assert warmup_cosine(110, **kw) == 0.1  # exactly min_lr at total_steps
    assert warmup_cosine(500, **kw) == 0.1
    assert warmup_cosine(60, **kw) == pytest.approx(0.55, abs=1e-15)  # midpoint: (base + min) / 2
    # a quarter into the cosine: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert warmup_cosine(35, **kw) == pytest.approx(0.8681980515339464, rel=1e-14)


@pytest.mark.parametrize("total,warmup,base,min_lr", [(100, 10, 3e-4, 0.0), (37, 0, 0.3, 0.1), (7, 6, 1.0, 0.5)])
def test_warmup_cosine_matches_formula_everywhere(total, warmup, base, min_lr):
    for step in range(total + 5):
        got = warmup_cosine(step, total, warmup, base, min_lr)
        assert got == pytest.approx(design_formula(step, total, warmup, base, min_lr), rel=1e-12, abs=1e-18)
    assert warmup_cosine(warmup, total, warmup, base, min_lr) == base
    assert warmup_cosine(total, total, warmup, base, min_lr) == min_lr
    lrs = [warmup_cosine(s, total, warmup, base, min_lr) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay after warmup


def test_warmup_zero_starts_at_base():
    assert warmup_cosine(0, 10, 0, 2.0) == 2.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=-1, total_steps=10, warmup_steps=0, base_lr=1.0), "step"),
    (dict(step=0, total_steps=0, warmup_steps=0, base_lr=1.0), "total_steps"),
    (dict(step=0, total_steps=10, warmup_steps=10, base_lr=1.0), "warmup_steps"),
    (dict(step=0, total_steps=10, warmup_steps=-1, base_lr=1.0), "warmup_steps"),
    (dict(step=0, total_steps=10, warmup_steps=1, base_lr=-1.0), "base_lr"),
    (dict(step=0, total_steps=10, warmup_steps=1, base_lr=1.0, min_lr=2.0), "min_lr"),
])
def test_warmup_cosine_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(**kwargs)


def torch_one_cycle(total, max_lr, **kw):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=total, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total,kw", [(100, {}), (57, dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0)),
                                      (10, dict(pct_start=0.5))])
def test_one_cycle_matches_torch(total, kw):
    expected = torch_one_cycle(total, 0.1, **kw)
    got = [one_cycle(s, total, 0.1, **kw) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-15, abs=0)
    assert one_cycle(total + 3, total, 0.1, **kw) == got[-1]  # past the end: stays at the final value
    init = 0.1 / kw.get("div_factor", 25.0)
    assert got[0] == pytest.approx(init) and got[-1] == pytest.approx(init / kw.get("final_div_factor", 1e4))


def test_one_cycle_bad_args():
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle(0, 10, 0.1, pct_start=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        one_cycle(0, 0, 0.1)


def metric_sequence(n, seed):
    rng = random.Random(seed)
    value, out = 1.0, []
    for _ in range(n):
        if rng.random() < 0.15:
            value *= rng.uniform(0.9, 0.99999)  # some improvements, some below the threshold
        out.append(value * (1 + rng.uniform(0, 1e-3)) if rng.random() < 0.5 else value)
    return out


@pytest.mark.parametrize("kw", [
    dict(), dict(patience=2), dict(patience=1, factor=0.5, min_lr=0.02), dict(patience=2, cooldown=3),
    dict(patience=1, threshold_mode="abs", threshold=1e-3), dict(patience=2, mode="max"),
])
def test_plateau_matches_reduce_lr_on_plateau(kw):
    metrics = metric_sequence(150, seed=len(kw))
    if kw.get("mode") == "max":
        metrics = [-m for m in metrics]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    plateau, lr = Plateau(**kw), 1.0
    expected, got = [], []
    for m in metrics:
        sched.step(m)
        expected.append(opt.param_groups[0]["lr"])
        lr = plateau.step(torch.tensor(m, dtype=torch.float64), lr)
        got.append(lr)
    assert got == expected
    assert len(set(expected)) > 1  # the sequence did trigger reductions


def test_plateau_state_dict_round_trip():
    metrics = metric_sequence(60, seed=3)
    a, lr_a = Plateau(patience=2), 1.0
    for m in metrics[:30]:
        lr_a = a.step(m, lr_a)
    b = Plateau(patience=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    lr_b = b.last_lr
    assert lr_b == lr_a
    for m in metrics[30:]:
        lr_a, lr_b = a.step(m, lr_a), b.step(m, lr_b)
        assert lr_a == lr_b
    fresh = Plateau()
    json.dumps(fresh.state_dict(), allow_nan=False)  # no inf before the first metric
    assert fresh.step(float("nan"), 1.0) == 1.0 and fresh.best is None


def test_plateau_bad_args():
    with pytest.raises(ValueError, match="factor"):
        Plateau(factor=1.0)
    with pytest.raises(ValueError, match="mode"):
        Plateau(mode="up")


def test_apply_lr_sets_every_group_with_lr_scale():
    a, b, c = (torch.zeros(1, requires_grad=True) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1},
                             {"params": [c], "lr": torch.tensor(0.5)}], lr=1.0)
    tensor_lr = opt.param_groups[2]["lr"]
    apply_lr(opt, 0.02)
    assert opt.param_groups[0]["lr"] == 0.02
    assert opt.param_groups[1]["lr"] == pytest.approx(0.002)
    assert opt.param_groups[2]["lr"] is tensor_lr and tensor_lr.item() == pytest.approx(0.02)
    apply_lr(opt, warmup_cosine(0, 10, 2, 1.0))
    assert [g["lr"] if not torch.is_tensor(g["lr"]) else g["lr"].item() for g in opt.param_groups] == [0, 0, 0]
