import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from blockyard.data import BinnedTargets, bin_index, freedman_diaconis_edges


def naive_percentile(x, q):  # numpy's default "linear" method, written out
    s = sorted(x)
    pos = q / 100 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def naive_bin(v, edges):  # bin i = [e_i, e_{i+1}), last bin closed, outside values clamped
    c = len(edges) - 1
    if v < edges[0]:
        return 0
    if v >= edges[-1]:
        return c - 1
    for i in range(c):
        if edges[i] <= v < edges[i + 1]:
            return i
    raise AssertionError("unreachable")


DISTRIBUTIONS = {
    "normal": lambda rng, n: rng.standard_normal(n),
    "log2_lognormal": lambda rng, n: np.log2(rng.lognormal(5.0, 2.0, n)),
    "uniform": lambda rng, n: rng.uniform(-100, 100, n),
    "integers_as_float": lambda rng, n: rng.integers(0, 50, n).astype(np.float64),
}


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("n", [2, 7, 1000, 50_000])
def test_matches_numpy_fd_edges(dist, n):
    x = DISTRIBUTIONS[dist](np.random.default_rng(n), n)
    if np.subtract(*np.percentile(x, [75, 25])) == 0:
        pytest.skip("tied sample: numpy falls back to one bin, we raise (tested below)")
    edges = freedman_diaconis_edges(x)
    assert isinstance(edges, torch.Tensor) and edges.dtype == torch.float64 and edges.dim() == 1
    np.testing.assert_array_equal(edges.numpy(), np.histogram_bin_edges(x, bins="fd"))


def test_width_and_count_follow_the_published_rule():
    x = np.random.default_rng(1).gamma(2.0, 3.0, 777)
    edges = freedman_diaconis_edges(torch.from_numpy(x).float())  # tensors of any float dtype accepted
    x32 = torch.from_numpy(x).float().double().numpy()
    width = 2 * (naive_percentile(x32, 75) - naive_percentile(x32, 25)) * len(x32) ** (-1 / 3)
    count = math.ceil((x32.max() - x32.min()) / width)
    assert edges.numel() == count + 1
    assert edges[0] == x32.min() and edges[-1] == x32.max()
    steps = edges.diff()
    assert bool((steps > 0).all()) and float(steps.max()) <= width
    torch.testing.assert_close(steps, torch.full_like(steps, (x32.max() - x32.min()) / count))


def test_hand_example():
    # 0..7: q25 = 1.75, q75 = 5.25, IQR 3.5, n^(-1/3) = 1/2 -> width 3.5, range 7 -> 2 bins.
    assert freedman_diaconis_edges(np.arange(8.0)).tolist() == [0.0, 3.5, 7.0]
    # A list works too, and max_bins caps the count by widening the bins.
    assert freedman_diaconis_edges(list(range(8)), max_bins=1).tolist() == [0.0, 7.0]


def test_log2_bins_the_log_of_the_values():
    h = np.random.default_rng(2).lognormal(6.0, 1.5, 2000)
    torch.testing.assert_close(freedman_diaconis_edges(h, log2=True), freedman_diaconis_edges(np.log2(h)))


def test_max_bins_caps_the_count():
    x = np.random.default_rng(3).standard_normal(100_000)
    free = freedman_diaconis_edges(x)
    capped = freedman_diaconis_edges(x, max_bins=20)
    assert free.numel() - 1 > 20 and capped.numel() == 21
    assert capped[0] == free[0] and capped[-1] == free[-1]


@pytest.mark.parametrize(("values", "kwargs", "error", "match"), [
    ([1.0], {}, ValueError, "values: expected at least 2 values, got 1"),
    ([], {}, ValueError, "values: expected at least 2 values, got 0"),
    ([1.0, float("nan"), 2.0, 3.0], {}, ValueError, "values: expected finite numbers, got 1 NaN/inf"),
    ([1.0, float("inf"), 2.0, 3.0], {}, ValueError, "values: expected finite numbers"),
    ([4.0, 4.0, 4.0], {}, ValueError, "values: all 3 values equal 4.0"),
    ([0.0] * 10 + [1.0], {}, ValueError, "values: interquartile range is 0"),
    ([0.5, 0.0, 2.0], {"log2": True}, ValueError, "values: expected values > 0 with log2=True"),
    ([1.0, 2.0, 3.0], {"max_bins": 0}, ValueError, "max_bins: expected a positive int"),
    (["a", "b"], {}, TypeError, "values: expected an array of real numbers"),
])
def test_degenerate_inputs_raise(values, kwargs, error, match):
    with pytest.raises(error, match=match):
        freedman_diaconis_edges(values, **kwargs)


def test_bin_index_hand_values_and_clamping():
    edges = torch.tensor([0.0, 1.0, 2.0, 3.0])
    values = torch.tensor([-5.0, 0.0, 0.5, 1.0, 2.999, 3.0, 10.0])
    assert bin_index(values, edges).tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert bin_index(torch.tensor([[1, 2], [7, -1]]), edges).tolist() == [[1, 2], [2, 0]]  # ints, any shape


def test_bin_index_matches_naive_loop_and_seed_formula():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(3000)
    edges = freedman_diaconis_edges(x[:2000])
    probe = np.concatenate([x, edges.numpy(), [-10.0, 10.0]])  # unseen values, exact edges, outside
    got = bin_index(torch.from_numpy(probe), edges).numpy()
    want = [naive_bin(v, edges.tolist()) for v in probe]
    np.testing.assert_array_equal(got, want)
    seed = np.clip(np.digitize(probe, edges.numpy()) - 1, 0, edges.numel() - 2)  # System A's ClassifWrapper
    np.testing.assert_array_equal(got, seed)


class DictData(Dataset):
    def __init__(self, targets, expose=None):
        self._t = torch.as_tensor(targets)
        self.calls = []
        if expose == "targets":
            self.targets = self._t
        elif expose == "column":
            self.column = lambda name: {"h": self._t}[name]

    def __len__(self):
        return len(self._t)

    def __getitem__(self, i):
        return {"P": torch.full((2, 3), float(i)), "h": self._t[i], "id": i}

    def __getitems__(self, items):
        self.calls.append(list(items))
        return [self[i] for i in items]


@pytest.mark.parametrize("log2", [False, True])
def test_wrapper_adds_label_and_keeps_item(log2):
    h = torch.from_numpy(np.random.default_rng(5).lognormal(6.0, 2.0, 300))
    edges = freedman_diaconis_edges(h[:200], log2=log2)
    base = DictData(h)
    ds = BinnedTargets(base, edges, target_key="h", log2=log2)
    assert len(ds) == 300 and ds.num_classes == edges.numel() - 1
    space = np.log2(h.numpy()) if log2 else h.numpy()
    for i in range(len(ds)):
        item, raw = ds[i], base[i]
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert int(item["label"]) == naive_bin(space[i], edges.tolist())
        assert set(item) == {*raw, "label"} and torch.equal(item["h"], raw["h"])
        assert torch.equal(item["P"], raw["P"]) and item["id"] == i  # the raw target and the rest are kept


@pytest.mark.parametrize("expose", [None, "targets", "column"])
def test_vectorised_labels_equal_per_item_labels(expose):
    h = torch.from_numpy(np.random.default_rng(6).lognormal(6.0, 2.0, 250)).float()
    ds = BinnedTargets(DictData(h, expose), freedman_diaconis_edges(h, log2=True), target_key="h", log2=True)
    labels = ds.labels
    assert labels.shape == (250,) and labels.dtype == torch.int64
    assert labels.tolist() == [int(ds[i]["label"]) for i in range(len(ds))]
    assert labels.min() == 0 and labels.max() == ds.num_classes - 1  # min and max of the data hit the end bins


def test_dataloader_batches_use_base_getitems_and_vectorised_labels():
    h = torch.linspace(0.0, 10.0, 40)
    base = DictData(h)
    ds = BinnedTargets(base, torch.linspace(0.0, 10.0, 6), target_key="h")
    batches = list(DataLoader(ds, batch_size=16, shuffle=False))
    assert base.calls == [list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]
    labels = torch.cat([b["label"] for b in batches])
    assert labels.tolist() == [naive_bin(v, torch.linspace(0.0, 10.0, 6).tolist()) for v in h.tolist()]
    assert torch.equal(torch.cat([b["h"] for b in batches]), h)


def test_tuple_items_with_integer_target_key():
    class TupleData(Dataset):  # System A's (params, h, P)
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.tensor([9.0, 4.0, 2.0]), torch.tensor([2.0 ** (i + 1)]), torch.zeros(6, 6)

    ds = BinnedTargets(TupleData(), [1.0, 2.0, 3.0, 4.0, 5.0], target_key=1, log2=True)
    _, h, P, label = ds[2]
    assert torch.equal(h, torch.tensor([8.0])) and P.shape == (6, 6) and int(label) == 2
    assert ds.labels.tolist() == [0, 1, 2, 3, 3]


def test_bin_centers_and_decode_round_trip():
    edges = torch.tensor([2.0, 4.0, 8.0, 9.0], dtype=torch.float64)
    ds = BinnedTargets(DictData(torch.zeros(1)), edges, target_key="h", log2=True)
    assert ds.bin_centers.tolist() == [3.0, 6.0, 8.5]
    decoded = ds.decode(torch.tensor([0, 2, 1]))
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, torch.tensor([8.0, 2 ** 8.5, 64.0]))
    # Each bin's decoded value lies in that bin again.
    assert ds.label_of(ds.decode(torch.arange(3), dtype=torch.float64)).tolist() == [0, 1, 2]
    plain = BinnedTargets(DictData(torch.zeros(1)), edges, target_key="h")
    torch.testing.assert_close(plain.decode(torch.tensor([1]), dtype=torch.float64), torch.tensor([6.0]).double())


def test_bad_inputs_are_named():
    base = DictData(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="edges: expected finite, strictly increasing"):
        BinnedTargets(base, [0.0, 2.0, 1.0], target_key="h")
    with pytest.raises(ValueError, match=r"edges: expected \(C \+ 1,\) with C >= 1, got \(1,\)"):
        BinnedTargets(base, [0.0], target_key="h")
    ds = BinnedTargets(base, [0.0, 1.0, 2.0], target_key="h")
    with pytest.raises(ValueError, match="h: NaN target has no bin"):
        ds[1]
    with pytest.raises(ValueError, match=r"P: expected a scalar target \(1 element\), got shape \(2, 3\)"):
        BinnedTargets(base, [0.0, 1.0], target_key="P")[0]
    with pytest.raises(ValueError, match="label_key: 'id' is already a key"):
        BinnedTargets(base, [0.0, 1.0], target_key="h", label_key="id")[0]
    with pytest.raises(TypeError, match="dataset: items must be tuples for target_key=1, got dict"):
        BinnedTargets(base, [0.0, 1.0], target_key=1)[0]
    with pytest.raises(ValueError, match="h: expected targets >= 0 with log2=True"):
        BinnedTargets(DictData(torch.tensor([-1.0])), [0.0, 1.0], target_key="h", log2=True)[0]


def test_python_float_targets_keep_float64_precision():
    class FloatData(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"h": 16777217.0}  # 2**24 + 1: float32 would round it down across the edge

    ds = BinnedTargets(FloatData(), [0.0, 16777217.0, 2e7], target_key="h")
    assert int(ds[0]["label"]) == 1 and ds.labels.tolist() == [1] and int(ds.label_of(16777217.0)) == 1
    assert int(ds.__getitems__([0])[0]["label"]) == 1
    listed = FloatData()
    listed.targets = [16777217.0]  # a plain list exposed as `targets`
    assert BinnedTargets(listed, [0.0, 16777217.0, 2e7], target_key="h").labels.tolist() == [1]
