import math
import random

import numpy as np
import pytest
import torch

from blockyard.train.sweeps import SweepSummary, seed_everything, sweep_summary


def draws():
    return random.random(), np.random.rand(), torch.rand(()).item()  # noqa: NPY002


def test_seed_everything_reproduces_every_rng():
    g1 = seed_everything(123)
    a = (*draws(), torch.rand((), generator=g1).item())
    g2 = seed_everything(123)
    b = (*draws(), torch.rand((), generator=g2).item())
    assert a == b
    seed_everything(124)
    assert draws() != a[:3]
    assert torch.equal(torch.Generator().manual_seed(123).get_state(), seed_everything(123).get_state())


def test_seed_everything_deterministic_flag_restored():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "7"])
def test_seed_everything_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)


def test_sweep_summary_hand_values():
    # successful runs: 3, 1, 4, 2 -> sorted 1 2 3 4; linear percentiles: q25 = 1.75, q75 = 3.25
    s = sweep_summary([3.0, 1.0, float("nan"), 4.0, 2.0, 10.0, None], failed=[0, 0, 0, 0, 0, 1, 0])
    assert isinstance(s, SweepSummary)
    assert s == SweepSummary(n=7, failures=3, median=2.5, q25=1.75, q75=3.25)


def test_sweep_summary_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=11)
    failed = rng.random(11) < 0.3
    s = sweep_summary(values.tolist(), failed.tolist())
    ok = values[~failed]
    assert (s.n, s.failures) == (11, int(failed.sum()))
    assert s.median == np.median(ok)
    assert (s.q25, s.q75) == tuple(np.percentile(ok, [25, 75]))


def test_sweep_summary_all_failed_is_nan():
    s = sweep_summary([1.0, 2.0], [True, True])
    assert (s.n, s.failures) == (2, 2)
    assert all(math.isnan(v) for v in (s.median, s.q25, s.q75))
    empty = sweep_summary([])
    assert empty.n == 0 and math.isnan(empty.median)


def test_sweep_summary_length_mismatch():
    with pytest.raises(ValueError, match="failed: expected 2"):
        sweep_summary([1.0, 2.0], [False])
