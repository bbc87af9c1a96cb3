"""FusionNet op sets and the metrics against them: every stored sample's op set equals a brute-force recount by the
pure-Python reference world, mirrors with the state, decodes on the device; the validation metrics against a hand
count and a naive loop over every op."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from fusion.batches import Batch, FusionSamples, ModelInputs, model_inputs
from fusion.build_data import build_dataset
from fusion.encoding import decode_ops, encode_ops, flip_ops, op_maps, state_channels
from fusion.env import FusionEnv
from fusion.metrics import FrequencyPrior, ValidationMetrics, pattern_table, proposal_scores
from fusion.model import FusionOutput
from fusion.ops import OPS
from fusion_reference import ReferenceGrid

from blockyard.data import GroupedStore
from blockyard.losses import LossOutput

SPLITS = ("train", "val", "test")
TINY = {"sizes": [(16, 16), (12, 20)], "per_cell": 2, "iters": 800, "fractions": (0.5, 0.25, 0.25)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_targets") / "data"
    build_dataset(out, workers=2, seed=5, verbose=False, **TINY)
    return out


def world(state):
    """Zones, H and V decoded from the 4 stored channels by this test alone."""
    s = np.asarray(state, dtype=np.float32)
    h, w = s.shape[1:]
    zones = np.unique(s[0], return_inverse=True)[1].reshape(h, w)
    return zones, s[1, :, : w - 1] > 0.5, s[2, : h - 1] > 0.5


def stored_ops(codes):
    v, y, x, d = decode_ops(np.asarray(codes))
    return {(int(a), int(b), int(c)): int(e) for a, b, c, e in zip(v, y, x, d)}


def test_stored_op_sets_equal_a_brute_force_recount_by_the_reference_world(data):
    rng = np.random.default_rng(0)
    checked, improving = 0, []
    for split in SPLITS:
        store = GroupedStore(data / split)
        assert store.fields["ops"] == "uint8" and store.spatial_fields == ("state", "ops")
        for i in rng.choice(len(store), size=min(12, len(store)), replace=False):
            sample = store[int(i)]
            ops = stored_ops(sample["ops"].numpy())
            reference = ReferenceGrid(*world(sample["state"].numpy())).enumerate_ops()  # every window, DFS + recount
            assert ops == reference, (split, i)
            y, x, v = (int(t) for t in sample["target"])
            assert ops[(v, y, x)] < 0  # the teacher's pick is one of the improving ops
            improving.append(sum(d < 0 for d in ops.values()))
            checked += 1
    assert checked >= 30 and max(improving) > 1  # the sets are not just the pick


def test_op_codes_round_trip_and_reject_what_cannot_be_stored():
    env = FusionEnv.create(20, 12, "voronoi", rng=np.random.default_rng(3), num_zones=4)
    pool = env.candidates()
    codes = encode_ops(pool.variant, pool.y, pool.x, pool.delta, 12, 20)
    assert codes.dtype == np.uint8 and codes.shape == (3, 12, 20) and np.count_nonzero(codes) == pool.size
    assert stored_ops(codes) == {(int(v), int(y), int(x)): int(d) for v, y, x, d in zip(*pool[:4])}
    with pytest.raises(ValueError, match="delta: expected values in"):
        encode_ops([0], [0], [0], [-5], 12, 20)
    with pytest.raises(ValueError, match="at most one op per window shape"):
        encode_ops([0, 1], [2, 2], [3, 3], [0, -1], 12, 20)  # two transposes at one anchor


def test_flipped_op_sets_are_the_op_sets_of_the_mirrored_worlds():
    for seed, pattern in enumerate(("voronoi", "islands", "stripes")):
        env = FusionEnv.create(13, 10, pattern, rng=np.random.default_rng(seed))
        for _ in range(60):  # leave the zigzag so that every op kind occurs
            pool = env.candidates()
            env.apply(pool.op(int(np.random.default_rng(seed + _).integers(pool.size))))
        pool = env.candidates()
        codes = encode_ops(pool.variant, pool.y, pool.x, pool.delta, env.height, env.width)
        for fx, fy in ((True, False), (False, True), (True, True)):
            mirror = env.mirrored(flip_x=fx, flip_y=fy).candidates()
            expect = encode_ops(mirror.variant, mirror.y, mirror.x, mirror.delta, env.height, env.width)
            np.testing.assert_array_equal(flip_ops(codes, fx, fy), expect)


def test_device_op_maps_equal_the_decoded_sets(data):
    store = GroupedStore(data / "val")
    batch = FusionSamples(store).__getitems__(list(range(min(6, len(store)))))
    maps = op_maps(batch.ops)
    for b in range(len(batch.ops)):
        ops = stored_ops(batch.ops[b].numpy())
        applies = {(int(v), int(y), int(x)) for v, y, x in zip(*np.nonzero(maps.applies[b].numpy()))}
        assert applies == set(ops)
        for (v, y, x), d in ops.items():
            assert maps.delta[b, v, y, x] == d and maps.gain[b, v, y, x] == max(-d, 0)
        assert int(maps.delta[b].abs().sum()) == sum(abs(d) for d in ops.values())


# --- metrics ---------------------------------------------------------------------------------
def one_hot_output(h, w, peaks):
    """Position logits with the given (y, x): logit per hypothesis, and a near-one-hot action per pixel."""
    position = torch.zeros(1, 2, h, w)
    action = torch.zeros(1, len(OPS), h, w)
    for (y, x), (logit, act) in peaks.items():
        position[0, 0, y, x] = logit
        action[0, act, y, x] = 20.0
    return position, action


def hand_batch():
    """Three 5x5 states. Sample 0: improving (n, 0, 0) -1 and (nl, 1, 1) -2, uphill (e, 2, 2) +1; the model ranks
    (e, 2, 2) first, then (nl, 1, 1), (n, 0, 0). Sample 1: one improving op (w, 3, 2) -3, ranked first once the
    model's favourite anchor (4, 4), where no window fits, is skipped. Sample 2: improving (s, 0, 3) and (sl, 2, 0),
    -1 each; the model's first is (s, 0, 3), also the teacher's pick (the only position hit)."""
    codes = np.zeros((3, 3, 5, 5), dtype=np.uint8)
    codes[0] = encode_ops([8, 0, 10], [0, 1, 2], [0, 1, 2], [-1, -2, 1], 5, 5)
    codes[1] = encode_ops([11], [3], [2], [-3], 5, 5)
    codes[2] = encode_ops([9, 2], [0, 2], [3, 0], [-1, -1], 5, 5)
    p0, a0 = one_hot_output(5, 5, {(2, 2): (5.0, 10), (1, 1): (4.0, 0), (0, 0): (3.0, 8)})
    p1, a1 = one_hot_output(5, 5, {(4, 4): (9.0, 0), (3, 2): (5.0, 11)})
    p2, a2 = one_hot_output(5, 5, {(0, 3): (6.0, 9), (2, 0): (1.0, 2)})
    out = FusionOutput(torch.cat([p0, p1, p2]), torch.cat([a0, a1, a2]))
    mask = torch.zeros(3, 5, 5, dtype=torch.bool)
    mask[0, 3, :] = True  # an illegal row on sample 0 (where 3x2 windows would fit)
    batch = Batch(torch.zeros(3, 4, 5, 5), torch.tensor([[1, 1, 0], [3, 2, 11], [0, 3, 9]]), torch.from_numpy(codes),
                  torch.zeros(3, 32, 5), torch.zeros(3, dtype=torch.long), torch.full((3,), 10),
                  torch.tensor([3, 1, 2]), torch.zeros(3, dtype=torch.bool))
    return out, batch, ModelInputs(None, mask, batch.target[:, :2], op_maps(batch.ops))


def fitting_count(mask):
    h, w = mask.shape
    return sum(1 for v, y, x in itertools.product(range(len(OPS)), range(h), range(w))
               if not mask[y, x] and y <= h - OPS[v].height and x <= w - OPS[v].width)


def metrics_of(out, batch, inputs):
    prior = FrequencyPrior({}, 0)
    metrics = ValidationMetrics(out.position.shape[1], prior, torch.device("cpu"))
    zero = torch.zeros(())
    metrics.update(out, batch, inputs, LossOutput(zero, {"pos": zero, "act": zero, "div": zero}))
    return metrics.compute()


def test_metrics_against_a_hand_count():
    out, batch, inputs = hand_batch()
    m = metrics_of(out, batch, inputs)
    assert m["improving_top1"] == pytest.approx(2 / 3)  # sample 0's top-1 is uphill, the others improve
    assert m["improving_top5"] == 1.0
    assert m["gain_top1"] == pytest.approx((-1 + 3 + 1) / 3)
    assert m["ceiling_top1"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3) == m["ceiling_op_top1"]
    assert m["ceiling_top5"] == 1.0 and m["improving_ops"] == pytest.approx(5 / 3)
    assert m["pos_acc_top1"] == pytest.approx(1 / 3) and m["pos_top1_of_ceiling"] == pytest.approx(0.5)
    uniform = sum(n / fitting_count(inputs.mask[b]) for b, n in enumerate((2, 1, 2))) / 3
    assert m["baseline_uniform_improving_top1"] == pytest.approx(uniform)
    assert (m["n_islands"], m["improving_top1_islands"], m["gain_top1_islands"]) == (1, 0.0, -1.0)
    assert (m["n_stripes"], m["improving_top1_stripes"], m["ceiling_top1_stripes"]) == (1, 1.0, 1.0)
    assert (m["pos_acc_top1_voronoi"], m["pos_top1_of_ceiling_voronoi"]) == (1.0, 2.0)  # 100% of a 50% ceiling
    assert "improving_top1_left_right" not in m
    table = pattern_table(m)
    assert "islands" in table and "left_right" not in table and "66.7%" in table


def naive_metrics(out, inputs):
    """Every (action, y, x) scored by max_k softmax_k(y, x) * softmax_action(y, x), in float64 loops; returns
    improving top-1, top-5, gain top-1 and the scores ``(B, 12 * H * W)`` (-1 where no candidate)."""
    position, action = out.position.double(), out.action.double()
    rows, all_scores = [], torch.full((position.shape[0], action.shape[1] * position[0, 0].numel()), -1.0)
    for b in range(position.shape[0]):
        mask = inputs.mask[b]
        h, w = mask.shape
        legal = ~mask.flatten()
        p = torch.stack([torch.where(legal, position[b, k].flatten(), torch.tensor(-1e30, dtype=torch.float64))
                         .softmax(0) for k in range(position.shape[1])]).amax(0).view(h, w)
        q = action[b].softmax(0).tolist()  # (12, h, w): softmax over the actions at each pixel
        p = p.tolist()
        scored = []
        for v, y, x in itertools.product(range(len(OPS)), range(h), range(w)):
            if not mask[y, x] and y <= h - OPS[v].height and x <= w - OPS[v].width:
                scored.append((p[y][x] * q[v][y][x], v, y, x))
                all_scores[b, (v * h + y) * w + x] = scored[-1][0]
        scored.sort(key=lambda t: -t[0])
        delta = inputs.ops.delta[b]
        top = [int(delta[v, y, x]) for _, v, y, x in scored[:5]]
        rows.append((top[0] < 0, any(d < 0 for d in top), -top[0]))
    return [sum(r[i] for r in rows) / len(rows) for i in range(3)] + [all_scores]


def test_metrics_against_a_naive_loop_on_stored_states(data):
    store = GroupedStore(data / "val")
    torch.manual_seed(0)
    groups = store.group_ids
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)[:3].tolist()
        batch = FusionSamples(store).__getitems__(idx)
        inputs = model_inputs(batch)
        b, _, h, w = batch.state.shape
        out = FusionOutput(torch.randn(b, 3, h, w) * 3, torch.randn(b, len(OPS), h, w) * 3)
        # boost sample 0's improving ops so that both hits and misses occur
        out.position[0, 1][inputs.ops.improving[0].any(0)] += 8
        out.action[0][inputs.ops.improving[0]] += 8
        m = metrics_of(out, batch, inputs)
        top1, top5, gain, scores = naive_metrics(out, inputs)
        torch.testing.assert_close(proposal_scores(out, inputs.mask), scores)
        assert (m["improving_top1"], m["improving_top5"]) == (pytest.approx(top1), pytest.approx(top5))
        assert m["gain_top1"] == pytest.approx(gain)
        assert 0 < m["improving_top5"]


def voronoi_batch(pad_to=None):
    """Six 11x14 voronoi worlds (their zone boundaries reach every edge), zero padded to ``pad_to`` if given."""
    states, codes = [], []
    for seed in range(6):
        env = FusionEnv.create(14, 11, "voronoi", rng=np.random.default_rng(seed), num_zones=5)
        pool = env.candidates()
        states.append(state_channels(env.zones, env.H, env.V))
        codes.append(encode_ops(pool.variant, pool.y, pool.x, pool.delta, 11, 14))
    state, ops = torch.from_numpy(np.stack(states)), torch.from_numpy(np.stack(codes))
    pad_mask = None
    if pad_to is not None:
        state = torch.nn.functional.pad(state, (0, pad_to - 14, 0, pad_to - 11))
        ops = torch.nn.functional.pad(ops, (0, pad_to - 14, 0, pad_to - 11))
        pad_mask = torch.ones(6, pad_to, pad_to, dtype=torch.bool)
        pad_mask[:, :11, :14] = False
    return Batch(state, torch.zeros(6, 3, dtype=torch.long), ops, torch.zeros(6, 32, 5),
                 torch.zeros(6, dtype=torch.long), torch.full((6,), 10), torch.full((6,), 2),
                 torch.zeros(6, dtype=torch.bool), pad_mask)


def test_metrics_of_a_padded_batch_equal_those_at_natural_resolution():
    """Padding (the seed's 128 canvas layout) changes nothing: no op is proposed in or into the padding."""
    natural, padded = voronoi_batch(), voronoi_batch(pad_to=24)
    b, h, w = 6, 11, 14
    torch.manual_seed(1)
    out = FusionOutput(torch.randn(b, 2, h, w) * 3, torch.randn(b, len(OPS), h, w) * 3)
    out.position[:, :, h - 2:] += 10  # favour the last rows and columns, where windows would reach the padding
    out.position[:, :, :, w - 2:] += 10
    big = FusionOutput(torch.nn.functional.pad(out.position, (0, 24 - w, 0, 24 - h), value=50.0),
                       torch.nn.functional.pad(out.action, (0, 24 - w, 0, 24 - h), value=50.0))
    small_inputs, big_inputs = model_inputs(natural), model_inputs(padded)
    assert (~small_inputs.mask[:, :, w - 2:]).any() and (~small_inputs.mask[:, h - 2:]).any()
    a, p = metrics_of(out, natural, small_inputs), metrics_of(big, padded, big_inputs)
    for key in ("improving_top1", "improving_top5", "gain_top1", "ceiling_top1", "baseline_uniform_improving_top1"):
        assert a[key] == pytest.approx(p[key]), key
    inside = proposal_scores(big, big_inputs.mask, padded.pad_mask).view(b, len(OPS), 24, 24)[..., :h, :w]
    torch.testing.assert_close(inside.reshape(b, -1), proposal_scores(out, small_inputs.mask))
