"""FusionNet dataset builder: exact replay, valid improving targets (also mirrored), history,
trajectory splits, train-only layer balancing, reproducibility across worker counts, build lifecycle."""
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from fusion.build_data import build_dataset, ensure_dataset, main, trajectory_samples
from fusion.encoding import HISTORY, crossing_map, flip_sample, state_channels
from fusion.env import FusionEnv
from fusion.grid import count_crossings
from fusion.ops import Op
from fusion.teacher import env_from_record, replay

from blockyard.data import GroupedStore, layer_index

FIELDS = {"state": "float16", "target": "int64", "ops": "uint8", "history": "float32", "history_len": "int64",
          "crossings": "int64", "initial_crossings": "int64", "trajectory": "str", "zone_pattern": "str"}
SPLITS = ("train", "val", "test")
FLIPS = ((True, False), (False, True), (True, True))
TINY = {"sizes": [(16, 16), (16, 24)], "per_cell": 1, "iters": 600, "fractions": (0.5, 0.25, 0.25)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion") / "data"
    summary = build_dataset(out, smoke=True, workers=2, verbose=False)
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    stores = {k: GroupedStore(out / k) for k in SPLITS}
    unique = {"train": rows(stores["train"], summary["samples"]["train_unique"]),
              "val": rows(stores["val"]), "test": rows(stores["test"])}
    return out, summary, records, stores, unique


def rows(store, unique_only=None):
    """Samples as numpy dicts in store order (first ``unique_only`` insertions only, if given)."""
    keep = np.arange(len(store)) if unique_only is None else np.flatnonzero(store.source_index < unique_only)
    out = []
    for i in keep:
        s = store[int(i)]
        out.append({k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in s.items()})
    return out


def unique_rows(smoke):
    return smoke[4]


def by_trajectory(samples):
    groups = defaultdict(list)
    for s in samples:
        groups[s["trajectory"]].append(s)
    return groups


def env_from_state(state, check=True):
    """Rebuild the world from the 4 stored channels alone (zones ch0, H ch1[:, :w-1], V ch2[:h-1])."""
    s = np.asarray(state, dtype=np.float32)
    h, w = s.shape[1:]
    assert not s[1, :, w - 1].any() and not s[2, h - 1].any(), "edge channels must be zero-padded"
    zones = np.unique(s[0], return_inverse=True)[1].reshape(h, w)
    return FusionEnv(zones, s[1, :, : w - 1] > 0.5, s[2, : h - 1] > 0.5, check=check)  # check: one path


def target_op(target):
    y, x, v = (int(t) for t in target)
    return Op(v, y, x)


def test_stores_have_the_contract_fields_and_dtypes(smoke):
    _, summary, _, stores, _ = smoke
    for name, store in stores.items():
        assert len(store) > 0, name
        assert store.fields == FIELDS
        assert store.spatial_fields == ("state", "ops")
        for g in store.groups:
            h, w = g.key
            assert g.shapes["state"] == (4, h, w) and g.shapes["ops"] == (3, h, w)
            assert g.shapes["target"] == (3,) and g.shapes["history"] == (HISTORY, 5)
            assert all(g.shapes[k] == () for k in ("history_len", "crossings", "initial_crossings"))
        assert {tuple(g.key) for g in store.groups} <= {(16, 16), (16, 24)}
    assert len(stores["train"]) == summary["samples"]["train"] > summary["samples"]["train_unique"]
    assert (smoke[0] / "build.json").exists()


def test_replay_reaches_the_recorded_crossings_and_the_stored_samples_are_its_improving_ops(smoke):
    """The stored samples of a trajectory are, in order, its ops that lower the crossings, each with the world
    before it, derived here without the builder's code: the test applies the record's ops to a FusionEnv itself
    and decodes every stored state with its own decoder (``env_from_state``)."""
    _, _, records, _, _ = smoke
    samples = {k: v for split in unique_rows(smoke).values() for k, v in by_trajectory(split).items()}
    assert len(records) == 24 and {r["zone_pattern"] for r in records} == {"left_right", "stripes", "voronoi",
                                                                            "islands"}
    for rec in records:
        result = replay(rec)
        assert result.crossings[0] == rec["initial_crossings"]
        assert result.crossings[-1] == rec["final_crossings"] == count_crossings(result.env.H, result.env.V,
                                                                                   result.env.zones)
        env = env_from_record(rec)
        zones = np.unique(env.zones, return_inverse=True)[1].reshape(env.zones.shape)  # labels as decoded
        improving = []  # (op, H before, V before, crossings before, crossings after)
        for op_record in rec["sequence_ops"]:
            op, H, V, before = Op.from_record(op_record), env.H.copy(), env.V.copy(), env.crossings
            assert env.apply(op).ok
            if env.crossings < before:
                improving.append((op, H, V, before, env.crossings))
        stored = samples.get(rec["run_id"], [])
        assert len(stored) == len(improving) == sum(b < a for a, b in zip(result.crossings, result.crossings[1:]))
        for j, (s, (op, H, V, before, _)) in enumerate(zip(stored, improving)):
            world = env_from_state(s["state"], check=False)
            np.testing.assert_array_equal(world.zones, zones)
            np.testing.assert_array_equal(world.H, H)
            np.testing.assert_array_equal(world.V, V)
            assert target_op(s["target"]) == op and s["crossings"] == before
            past = [(o.variant, o.y, o.x, b, a) for o, _, _, b, a in improving[max(0, j - HISTORY):j]]
            assert s["history_len"] == len(past) and not s["history"][len(past):].any()
            np.testing.assert_array_equal(s["history"][:len(past)], np.asarray(past, np.float32).reshape(-1, 5))
            assert s["initial_crossings"] == rec["initial_crossings"] and s["zone_pattern"] == rec["zone_pattern"]
    assert sum(r["initial_crossings"] - r["final_crossings"] for r in records) > 0


def test_every_target_improves_the_state_rebuilt_from_the_channels_and_history_is_consistent(smoke):
    for split, samples in unique_rows(smoke).items():
        for run_id, traj in by_trajectory(samples).items():
            previous = []
            for k, s in enumerate(traj):
                env = env_from_state(s["state"])
                assert s["crossings"] == env.crossings == count_crossings(env.H, env.V, env.zones)
                assert crossing_map(torch.from_numpy(s["state"])[None]).sum().item() == 2 * s["crossings"]
                result = env.evaluate(target_op(s["target"]))
                assert result.ok and result.delta < 0, (split, run_id, k, s["target"])
                n = s["history_len"]
                assert n == min(k, HISTORY)
                assert not s["history"][n:].any()
                expect = np.asarray(previous[len(previous) - n:], dtype=np.float32).reshape(n, 5)
                np.testing.assert_array_equal(s["history"][:n], expect)
                v, y, x = target_op(s["target"])
                previous.append((v, y, x, s["crossings"], s["crossings"] + result.delta))


def test_flipped_targets_and_history_stay_applicable_improving_ops(smoke):
    checked = 0
    for samples in unique_rows(smoke).values():
        for traj in by_trajectory(samples).values():
            flipped_targets = {flip: [] for flip in FLIPS}  # per flip: (mirrored target, mirrored world)
            for k, s in enumerate(traj):
                env = env_from_state(s["state"], check=False)  # checked in the test above
                op, n = target_op(s["target"]), int(s["history_len"])
                delta = env.evaluate(op).delta
                for fx, fy in FLIPS:
                    fs, ft, fh = flip_sample(s["state"], s["target"], s["history"], n, fx, fy)
                    # the mirrored state is exactly the encoding of the mirrored world
                    mirror = env.mirrored(flip_x=fx, flip_y=fy)
                    np.testing.assert_array_equal(fs, state_channels(mirror.zones, mirror.H, mirror.V))
                    assert mirror.crossings == s["crossings"]
                    result = mirror.evaluate(target_op(ft))
                    assert result.ok and result.delta == delta < 0, (fx, fy, s["target"], ft)
                    assert target_op(ft) == env.mirror_op(op, flip_x=fx, flip_y=fy)
                    # history entries: the mirrored ops of earlier samples, each valid on its own mirrored state
                    np.testing.assert_array_equal(fh[:, 3:], s["history"][:, 3:])
                    assert not fh[n:].any()
                    done = flipped_targets[(fx, fy)]
                    for i in range(n):
                        entry = Op(int(fh[i, 0]), int(fh[i, 1]), int(fh[i, 2]))
                        assert entry == done[k - n + i][0]
                        assert done[k - n + i][1].evaluate(entry).delta < 0
                    done.append((target_op(ft), mirror))
                    # flipping twice is the identity
                    for a, b in zip(flip_sample(fs, ft, fh, n, fx, fy), (s["state"], s["target"], s["history"])):
                        np.testing.assert_array_equal(a, b)
                    checked += 1
    assert checked > 500


def test_splits_share_no_trajectory(smoke):
    out, _, records, stores, _ = smoke
    splits = json.loads((out / "splits.json").read_text())
    sets = {k: set(v) for k, v in splits.items()}
    assert set(sets) == set(SPLITS) and all(sets.values())
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert set().union(*sets.values()) == {r["run_id"] for r in records}
    for name, store in stores.items():
        in_store = set(store.column("trajectory"))
        assert in_store <= sets[name], name
        assert {r["run_id"] for r in records if r["run_id"] in sets[name] and trajectory_samples(r)["crossings"].size
                } == in_store
    for pattern in ("left_right", "stripes", "voronoi", "islands"):  # stratified: every pattern in every split
        assert all(any(r["zone_pattern"] == pattern for r in records if r["run_id"] in sets[k]) for k in SPLITS)


def sample_key(s):
    return (s["trajectory"], s["state"].tobytes(), tuple(s["target"]), int(s["history_len"]))


def test_layer_balancing_oversamples_inner_layers_in_train_only(smoke):
    _, summary, _, stores, _ = smoke
    for name in ("val", "test"):
        keys = [sample_key(s) for s in rows(stores[name])]
        assert len(set(keys)) == len(keys), f"{name} must hold no duplicates"
    train = rows(stores["train"])
    unique = summary["samples"]["train_unique"]
    copies = Counter(sample_key(s) for s in train)
    assert len(copies) == unique < len(train) and max(copies.values()) <= 4
    # per grid shape, layer l with c unique samples ends with min(M, 4c) (M = the largest layer)
    per_group, unique_layers = defaultdict(Counter), {}
    for s in train:
        h, w = s["state"].shape[1:]
        layer = int(layer_index(s["target"][0], s["target"][1], h, w))
        per_group[(h, w)][layer] += 1
        unique_layers[sample_key(s)] = ((h, w), layer)
    for shape, layers in per_group.items():
        counts = Counter(la for sh, la in unique_layers.values() if sh == shape)
        top = max(counts.values())
        assert layers == Counter({la: min(top, 4 * c) for la, c in counts.items()}), shape
        assert sum(layers.values()) > sum(counts.values())


def trimmed_records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "runtime_sec"}
            for line in (out / "trajectories.jsonl").read_text().splitlines()]


def store_digests(out):
    return {k: [(g["key"], g["count"], g["sha256"]) for g in json.loads((out / k / "index.json").read_text())["groups"]]
            for k in SPLITS}


def test_build_is_reproducible_regardless_of_worker_count(tmp_path):
    a = build_dataset(tmp_path / "one", workers=1, seed=3, verbose=False, **TINY)
    b = build_dataset(tmp_path / "two", workers=2, seed=3, verbose=False, **TINY)
    assert a["samples"] == b["samples"] and a["cells"] == b["cells"]
    assert trimmed_records(tmp_path / "one") == trimmed_records(tmp_path / "two")
    assert store_digests(tmp_path / "one") == store_digests(tmp_path / "two")
    assert (tmp_path / "one" / "splits.json").read_text() == (tmp_path / "two" / "splits.json").read_text()
    seeds = {r["seed"] for r in trimmed_records(tmp_path / "one")}
    assert len(seeds) == a["trajectories"]  # one seed per trajectory, derived from (seed, index)


def test_unfinished_builds_are_rebuilt_and_finished_ones_never_silently_overwritten(tmp_path, monkeypatch):
    import fusion.store_build as sb

    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "train" / "junk.bin").write_bytes(b"half-written")
    (out / "trajectories.jsonl").write_text("not json\n")
    ensure_dataset(out, workers=1, verbose=False, **TINY)  # no build.json: rebuilt from scratch
    assert not (out / "train" / "junk.bin").exists()
    assert GroupedStore(out / "train") and len(trimmed_records(out)) == 8
    stamp = (out / "build.json").stat().st_mtime_ns
    digests = store_digests(out)

    ensure_dataset(out, workers=1, verbose=False, **TINY)  # finished: kept as it is
    with pytest.raises(FileExistsError, match="finished build"):
        build_dataset(out, workers=1, verbose=False, **TINY)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--smoke"])
    assert exit_info.value.code == 1
    assert (out / "build.json").stat().st_mtime_ns == stamp and store_digests(out) == digests

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the summary")

    monkeypatch.setattr(sb, "_summary", crash)
    with pytest.raises(RuntimeError, match="killed before the summary"):
        build_dataset(out, workers=1, seed=1, force=True, verbose=False, **TINY)
    assert not (out / "build.json").exists()  # a crashed rebuild is never mistaken for a finished one
    monkeypatch.undo()
    ensure_dataset(out, workers=1, seed=1, verbose=False, **TINY)
    assert (out / "build.json").exists() and store_digests(out) != digests
