from collections import Counter

import numpy as np
import pytest
import torch

from blockyard.data import balanced_indices, group_split, layer_index, stratified_split


def naive_layer(y, x, h, w):
    return min(y, x, h - 1 - y, w - 1 - x)


def test_layer_index_matches_the_definition_numpy_and_torch():
    h, w = 7, 10
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    expected = np.array([[naive_layer(y, x, h, w) for x in range(w)] for y in range(h)])
    np.testing.assert_array_equal(layer_index(ys, xs, h, w), expected)
    got = layer_index(torch.from_numpy(ys), torch.from_numpy(xs), h, w)
    assert isinstance(got, torch.Tensor) and torch.equal(got, torch.from_numpy(expected))
    assert expected.max() == 3 and layer_index(0, 5, h, w) == 0


def test_layer_index_per_sample_grid_sizes():
    y, x = np.array([5, 5, 20]), np.array([5, 5, 3])
    sizes = np.array([16, 32, 24])
    np.testing.assert_array_equal(layer_index(y, x, sizes, sizes),
                                  [naive_layer(*a) for a in zip(y, x, sizes, sizes)])


def test_balanced_counts_reach_the_outer_layer_up_to_the_cap():
    layers = np.repeat([0, 1, 2, 3], [100, 40, 10, 30])
    rng = np.random.default_rng(0)
    rng.shuffle(layers)
    idx = balanced_indices(layers, max_factor=4, seed=0)
    np.testing.assert_array_equal(idx[:len(layers)], np.arange(len(layers)))  # originals first
    counts = Counter(layers[idx].tolist())
    assert counts == {0: 100, 1: 100, 2: 40, 3: 100}  # min(outer, 4 * count)
    mult = Counter(idx.tolist())
    for layer in (1, 2, 3):  # every member repeated floor or ceil of the ratio, not at random
        m = [mult[i] for i in np.flatnonzero(layers == layer)]
        assert max(m) - min(m) <= 1
    assert set(mult[i] for i in np.flatnonzero(layers == 0)) == {1}


def test_balanced_is_seeded_and_capped_by_max_factor():
    layers = np.repeat([0, 1], [50, 20])  # 30 extras: one full pass + 10 drawn
    a, b = balanced_indices(layers, seed=1), balanced_indices(layers, seed=1)
    c = balanced_indices(layers, seed=2)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) == 100 and not np.array_equal(a, c)
    layers = np.repeat([0, 1], [50, 7])
    assert Counter(layers[balanced_indices(layers, max_factor=2.5)].tolist())[1] == 17  # floor(7 * 2.5)
    np.testing.assert_array_equal(balanced_indices(layers, max_factor=1), np.arange(57))
    with pytest.raises(ValueError, match="max_factor"):
        balanced_indices(layers, max_factor=0.5)


def test_balanced_per_group():
    layers = np.array([0] * 20 + [1] * 5 + [0] * 3 + [1] * 6)
    groups = np.array([16] * 25 + [32] * 9)
    idx = balanced_indices(layers, max_factor=4, groups=groups)
    pairs = Counter(zip(groups[idx].tolist(), layers[idx].tolist()))
    # group 16: layer 1 5 -> 20; group 32: layer 1 is the largest, layer 0 3 -> 6
    assert pairs == {(16, 0): 20, (16, 1): 20, (32, 0): 6, (32, 1): 6}


def test_stratified_split_preserves_shares():
    keys = np.array(["left_right"] * 50 + ["stripes"] * 30 + ["voronoi"] * 20)
    train, val = stratified_split(keys, 0.1, seed=0)
    assert Counter(keys[val].tolist()) == {"left_right": 5, "stripes": 3, "voronoi": 2}
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    again = stratified_split(keys, 0.1, seed=0)
    assert np.array_equal(again.val, val) and not np.array_equal(stratified_split(keys, 0.1, seed=1).val, val)


def test_stratified_split_rounds_within_one_item_per_key():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 7, size=333)
    for frac in (0.0, 0.13, 0.5, 1.0):
        train, val = stratified_split(keys, frac, seed=4)
        assert len(val) == round(333 * frac) and len(train) + len(val) == 333
        for k in range(7):
            exact = (keys == k).sum() * frac
            assert abs((keys[val] == k).sum() - exact) < 1


def test_group_split_keeps_groups_whole():
    traj = np.repeat(np.arange(60), np.random.default_rng(0).integers(1, 30, size=60))
    parts = group_split(traj, (0.8, 0.1, 0.1), seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(traj)))
    seen = [set(traj[p].tolist()) for p in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    biggest = np.bincount(traj).max()
    for part, frac in zip(parts, (0.8, 0.1, 0.1)):
        assert abs(len(part) - frac * len(traj)) <= biggest


def test_group_split_with_strata_keeps_each_stratum_share():
    traj = np.repeat(np.arange(40), 5)
    pattern = np.repeat(np.array(["lr", "vor"]), 100)  # trajectories 0..19 lr, 20..39 vor
    _, val = group_split(traj, (0.8, 0.2), seed=5, strata=pattern)
    assert Counter(pattern[val].tolist()) == {"lr": 20, "vor": 20}
    with pytest.raises(ValueError, match="strata"):
        group_split([0, 0], (0.5, 0.5), strata=["a", "b"])
    with pytest.raises(ValueError, match="fractions"):
        group_split([0, 1], (0.5, 0.6))
