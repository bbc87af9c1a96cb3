"""State perturbation (DAgger-lite): the perturbed state is one Hamiltonian path reached by replaying the applied ops
in the pure-Python reference world, its labels are that world's exact op set, and the training set perturbs as a
pure function of (seed, epoch, index)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion.batches import FusionSamples
from fusion.build_data import build_dataset
from fusion.encoding import decode_ops, flip_sample
from fusion.grid import is_hamiltonian_path
from fusion.perturb import perturb_state
from fusion_reference import ReferenceGrid

from blockyard.data import BucketBatchSampler, GroupedStore

TINY = {"sizes": [(16, 16), (12, 20)], "per_cell": 2, "iters": 800, "fractions": (0.5, 0.25, 0.25)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_perturb") / "data"
    build_dataset(out, workers=2, seed=7, verbose=False, **TINY)
    return GroupedStore(out / "train")


def reference_of(state):
    """The reference world of stored channels, decoded by this test alone."""
    s = np.asarray(state, dtype=np.float32)
    h, w = s.shape[1:]
    zones = np.unique(s[0], return_inverse=True)[1].reshape(h, w)
    return ReferenceGrid(zones, s[1, :, : w - 1] > 0.5, s[2, : h - 1] > 0.5)


def op_set(codes):
    v, y, x, d = decode_ops(np.asarray(codes))
    return {(int(a), int(b), int(c)): int(e) for a, b, c, e in zip(v, y, x, d)}


@pytest.mark.parametrize("steps", [1, 3])
def test_perturbed_states_replay_exactly_in_the_reference_world_and_are_labelled_by_it(store, steps):
    rng = np.random.default_rng(steps)
    moved = skipped = 0
    for i in rng.choice(len(store), size=12, replace=False):
        state = store[int(i)]["state"].numpy()
        result = perturb_state(state, steps, np.random.default_rng([1, int(i)]))
        ref = reference_of(state)
        if result is None:  # only when the perturbed state really has no improving op
            skipped += 1
            continue
        assert len(result.applied) == steps
        for op in result.applied:  # each applied op is a valid op of the state it was applied to
            assert ref.try_op(op.variant, op.y, op.x, keep=True) is not None, op
        h, w = state.shape[1:]
        after = np.asarray(result.state, dtype=np.float32)
        np.testing.assert_array_equal(after[1, :, : w - 1] > 0.5, np.array(ref.H))
        np.testing.assert_array_equal(after[2, : h - 1] > 0.5, np.array(ref.V))
        np.testing.assert_array_equal(after[[0, 3]], state[[0, 3]].astype(np.float32))  # zones never move
        assert is_hamiltonian_path(np.array(ref.H), np.array(ref.V))
        assert result.crossings == ref.crossings()
        ops = op_set(result.ops)
        assert ops == ref.enumerate_ops()  # the exact op set of the new state
        y, x, v = (int(t) for t in result.target)
        assert ops[(v, y, x)] < 0
        moved += 1
    assert moved >= 8 and moved + skipped == 12


def test_no_label_means_no_improving_op():
    """A state with no improving op after the perturbation is refused (``None``), never given a made-up target."""
    from fusion.encoding import state_channels
    from fusion.env import FusionEnv

    env = FusionEnv.create(8, 6, "left_right", init_pattern="vertical_zigzag")  # optimal: 1 crossing, K - 1 = 1
    state = state_channels(env.zones, env.H, env.V)
    results = [perturb_state(state, 1, np.random.default_rng(s)) for s in range(20)]
    for r in results:
        if r is not None:
            assert min(op_set(r.ops).values()) < 0
    assert any(r is None for r in results)  # from the optimum, a neutral move often leaves nothing to improve
    with pytest.raises(ValueError, match="steps: expected >= 1"):
        perturb_state(state, 0, np.random.default_rng(0))


def test_training_set_perturbs_as_a_function_of_seed_epoch_and_index(store):
    a = FusionSamples(store, augment=True, seed=3, perturb=0.5, perturb_steps=2)
    b = FusionSamples(store, augment=True, seed=3, perturb=0.5, perturb_steps=2)
    a.set_epoch(2)
    b.set_epoch(5)
    b.set_epoch(2)
    batch = next(iter(BucketBatchSampler(store, 12, seed=0)))
    first = a.__getitems__(batch)
    for x, y in zip(first, b.__getitems__(batch[::-1])):  # other order, same samples
        if x is not None:
            torch.testing.assert_close(x, y.flip(0), rtol=0, atol=0)
    one = a.__getitems__([batch[4]])  # alone: the same draw
    torch.testing.assert_close(one.state[0], first.state[4], rtol=0, atol=0)
    assert first.perturbed.any() and not first.perturbed.all()
    chosen = a.perturbed[batch]
    assert not (first.perturbed.numpy() & ~chosen).any()
    for j, i in enumerate(batch):  # each perturbed sample: perturb_state of the flipped stored sample, rng (3, 2, i, 2)
        raw = store[i]
        fx, fy = (bool(f) for f in a.flips[i])
        state = raw["state"].numpy()
        if fx or fy:
            state = flip_sample(state, raw["target"].numpy(), raw["history"].numpy(), int(raw["history_len"]),
                                fx, fy)[0]
        expect = perturb_state(state, 2, np.random.default_rng([3, 2, i, 2])) if chosen[j] else None
        if expect is None:
            assert not first.perturbed[j]
            np.testing.assert_array_equal(first.state[j].numpy(), state)
        else:
            assert first.perturbed[j]
            np.testing.assert_array_equal(first.state[j].numpy(), expect.state)
            np.testing.assert_array_equal(first.ops[j].numpy(), expect.ops)
            np.testing.assert_array_equal(first.target[j].numpy(), expect.target)
        np.testing.assert_array_equal(first.history[j].numpy()[:, 3:], raw["history"].numpy()[:, 3:])
    a.set_epoch(3)  # another epoch perturbs other samples, or the same ones otherwise
    assert not np.array_equal(a.perturbed, b.perturbed)
    never = FusionSamples(store, augment=True, seed=3)
    never.set_epoch(2)
    plain = never.__getitems__(batch)
    assert not plain.perturbed.any()
    torch.testing.assert_close(plain.state[~first.perturbed], first.state[~first.perturbed], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [({"perturb": 1.5}, "perturb: expected a probability"),
                                            ({"perturb": 0.5, "perturb_steps": 0}, "perturb_steps: expected >= 1")])
def test_bad_settings_are_refused(store, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusionSamples(store, **kwargs)
