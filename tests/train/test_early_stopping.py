import json
import math
import random

import pytest
import torch

from blockyard.train import EarlyStopping


def run(es: EarlyStopping, metrics) -> int | None:
    """1-based index of the check that stopped, or None."""
    for t, m in enumerate(metrics, start=1):
        if es.step(m):
            return t
    return None


def reference_stop(metrics, patience, mode, min_delta):
    """Keras/Lightning rule, spelled out: compare with the best so far, count misses in a row."""
    best, misses = None, 0
    for t, m in enumerate(metrics, start=1):
        if best is None or (m < best - min_delta if mode == "min" else m > best + min_delta):
            best, misses = m, 0
            continue
        misses += 1
        if misses >= patience:
            return t
    return None


@pytest.mark.parametrize(
    ("metrics", "kwargs", "stop", "best"),
    [
        ([5, 4, 4, 4.5, 3.9], {"patience": 2}, 4, 4),  # an equal value is not an improvement
        ([5, 4.6, 4.4, 4.0, 4.0], {"patience": 2, "min_delta": 0.5}, 5, 4.4),  # 4.6 and 4.0 too small
        ([1, 2, 3, 2.5, 3.5, 3.4, 3.3], {"patience": 2, "mode": "max"}, 7, 3.5),
        ([3, 2, 1, 0.5], {"patience": 1}, None, 0.5),
        ([3, 3], {"patience": 0}, 2, 3),
    ],
)
def test_stops_at_hand_computed_check(metrics, kwargs, stop, best):
    es = EarlyStopping(**kwargs)
    assert run(es, metrics) == stop
    assert es.best == best
    assert es.stopped == (stop is not None)


def test_matches_reference_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        patience, mode = rng.randint(0, 4), rng.choice(["min", "max"])
        min_delta = rng.choice([0.0, 0.05, 0.2])
        metrics = [round(rng.uniform(0, 1), 2) for _ in range(rng.randint(1, 15))]
        assert run(EarlyStopping(patience, mode=mode, min_delta=min_delta), metrics) == reference_stop(
            metrics, patience, mode, min_delta
        ), (patience, mode, min_delta, metrics)


def test_non_finite_metric_stops_at_once_or_counts_as_a_miss():
    assert run(EarlyStopping(patience=5), [1.0, float("nan"), 0.5]) == 2
    es = EarlyStopping(patience=2, stop_on_nonfinite=False)
    assert run(es, [1.0, float("nan"), 0.5, float("inf"), float("nan")]) == 5
    assert es.best == 0.5


def test_accepts_tensor_metrics():
    es = EarlyStopping(patience=1)
    assert not es.step(torch.tensor(2.0))
    assert es.step(torch.tensor(3.0, requires_grad=True) * 1)
    assert es.best == 2.0 and isinstance(es.best, float)


def test_state_dict_is_json_and_resume_gives_the_same_decisions():
    metrics = [1.0, 0.8, 0.85, 0.7, 0.75, 0.76, 0.9, 0.6, 0.61, 0.62, 0.63]
    full = EarlyStopping(patience=3, min_delta=0.01)
    decisions = [full.step(m) for m in metrics]

    first = EarlyStopping(patience=3, min_delta=0.01)
    head = [first.step(m) for m in metrics[:5]]
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = EarlyStopping(patience=3, min_delta=0.01)
    resumed.load_state_dict(state)
    assert head + [resumed.step(m) for m in metrics[5:]] == decisions
    assert resumed.state_dict() == full.state_dict()
    assert EarlyStopping(patience=1).state_dict()["best"] is None  # no inf in JSON


def test_load_state_dict_rejects_other_mode_and_missing_keys():
    state = EarlyStopping(patience=1, mode="max").state_dict()
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(patience=1).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        EarlyStopping(patience=1).load_state_dict({"mode": "min"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"patience": -1}, "patience"), ({"patience": 1.5}, "patience"), ({"patience": 2, "mode": "mean"}, "mode"),
     ({"patience": 2, "min_delta": -0.1}, "min_delta"), ({"patience": 2, "min_delta": math.nan}, "min_delta")],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)
