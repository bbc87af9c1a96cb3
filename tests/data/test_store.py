import gc
import json
import os
import pickle
import resource

import numpy as np
import pytest
import torch
from safetensors import safe_open

from blockyard.data import CorruptedStoreError, GroupedStore, GroupedStoreWriter

SHAPES = [(16, 16), (24, 24), (16, 24), (16, 16), (24, 24)]


def make_samples(n=30, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SHAPES[i % len(SHAPES)]
        out.append({
            "state": torch.from_numpy(rng.standard_normal((4, h, w))).half(),
            "target": np.array([rng.integers(h), rng.integers(w), rng.integers(12)], dtype=np.int16),
            "history": rng.standard_normal((32, 5)).astype(np.float32),
            "history_len": int(rng.integers(33)),
            "crossings": np.int32(rng.integers(1000)),
            "ratio": float(rng.random()),
            "flag": bool(i % 2),
            "emb": torch.randn(3, dtype=torch.float32).bfloat16(),
            "code": np.uint16(60000 + i),
            "trajectory": f"run_{i // 4}",
        })
    return out


def assert_same(stored, original):
    assert set(stored) == set(original)
    for name, value in original.items():
        got = stored[name]
        if isinstance(value, str):
            assert got == value
            continue
        want = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_round_trip_values_and_dtypes_exact(tmp_path):
    samples = make_samples()
    store = GroupedStore.write(tmp_path / "s", samples)
    assert len(store) == len(samples)
    assert store.fields["state"] == "float16" and store.fields["emb"] == "bfloat16"
    assert store.fields["history_len"] == "int64" and store.fields["ratio"] == "float64"
    assert store.fields["trajectory"] == "str" and store.spatial_fields == ("state",)
    reopened = GroupedStore(tmp_path / "s")  # verify=True
    for i, src in enumerate(reopened.source_index):
        assert_same(reopened[i], samples[src])
    assert_same(reopened[-1], samples[reopened.source_index[-1]])


def test_groups_are_contiguous_ranges_by_shape(tmp_path):
    samples = make_samples()
    store = GroupedStore.write(tmp_path / "s", samples)
    assert [g.key for g in store.groups] == [(16, 16), (24, 24), (16, 24)]  # first appearance
    assert [g.count for g in store.groups] == [12, 12, 6]
    assert store.groups[0].start == 0 and all(a.stop == b.start for a, b in zip(store.groups, store.groups[1:]))
    for g, group in enumerate(store.groups):
        for i in range(group.start, group.stop):
            assert store.group_of(i) == g
            assert tuple(store[i]["state"].shape[-2:]) == group.key
    np.testing.assert_array_equal(store.group_of(np.arange(len(store))), store.group_ids)
    # Within a group the insertion order is kept.
    assert all(np.all(np.diff(store.source_index[g.start:g.stop]) > 0) for g in store.groups)
    assert sorted(store.source_index.tolist()) == list(range(len(samples)))


def test_get_batch_equals_stacked_items_and_rejects_mixed_groups(tmp_path):
    store = GroupedStore.write(tmp_path / "s", make_samples())
    idx = [5, 1, 5, 9]  # group 0, any order, repeats
    batch = store.get_batch(idx)
    for name in store.fields:
        if store.fields[name] == "str":
            assert batch[name] == [store[i][name] for i in idx]
        else:
            assert torch.equal(batch[name], torch.stack([store[i][name] for i in idx]))
    with pytest.raises(ValueError, match="indices: expected all in group 0"):
        store.get_batch([0, store.groups[1].start])
    with pytest.raises(IndexError, match="indices"):
        store.get_batch([len(store)])


def test_files_are_standard_safetensors(tmp_path):
    store = GroupedStore.write(tmp_path / "s", make_samples())
    group = store.groups[2]
    with safe_open(str(tmp_path / "s" / group.file), framework="pt") as fh:
        state = fh.get_tensor("state")
        emb = fh.get_tensor("emb")
    assert state.dtype == torch.float16 and state.shape == (group.count, 4, 16, 24)
    assert torch.equal(state, store.get_batch(range(group.start, group.stop))["state"])
    assert emb.dtype == torch.bfloat16


def test_streaming_with_tiny_buffer_writes_identical_files(tmp_path):
    samples = make_samples()
    GroupedStore.write(tmp_path / "a", samples)
    GroupedStore.write(tmp_path / "b", iter(samples), buffer_bytes=1)  # flush after every sample
    index_a = json.loads((tmp_path / "a" / "index.json").read_text())
    index_b = json.loads((tmp_path / "b" / "index.json").read_text())
    assert index_a == index_b
    for g in index_a["groups"]:
        assert (tmp_path / "a" / g["file"]).read_bytes() == (tmp_path / "b" / g["file"]).read_bytes()


def test_group_key_callable_and_field_name(tmp_path):
    samples = [{"img": torch.zeros(2, h, 8), "aux": torch.zeros(3, h)} for h in (4, 6, 4)]
    by_aux = GroupedStore.write(tmp_path / "a", samples, group_key="aux")
    assert [g.key for g in by_aux.groups] == [(3, 4), (3, 6)] and by_aux.spatial_fields == ("aux",)
    with pytest.raises(ValueError, match=r"img: expected \(2, 4, 8\) in group \(3, 5\), got \(2, 6, 8\)"):
        GroupedStore.write(tmp_path / "c", [{**s, "aux": torch.zeros(3, 5)} for s in samples], group_key="aux")
    by_fn = GroupedStore.write(tmp_path / "b", samples, group_key=lambda s: s["img"].shape[-2:])
    assert [g.key for g in by_fn.groups] == [(4, 8), (6, 8)] and by_fn.spatial_fields == ("img",)


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_file_is_named(tmp_path, where):
    GroupedStore.write(tmp_path / "s", make_samples())
    victim = tmp_path / "s" / "group_0001_24x24.safetensors"
    raw = bytearray(victim.read_bytes())
    pos = len(raw) - 100 if where == "data" else 20
    raw[pos] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptedStoreError, match=r"group_0001_24x24\.safetensors.*sha256"):
        GroupedStore(tmp_path / "s")
    if where == "header":  # without the checksum, the damage still surfaces, named, on first access
        store = GroupedStore(tmp_path / "s", verify=False)
        assert store[0]["state"].shape == (4, 16, 16)
        with pytest.raises(CorruptedStoreError, match=r"group_0001_24x24\.safetensors"):
            store[store.groups[1].start]


def test_truncated_or_missing_file_is_named_even_without_verify(tmp_path):
    GroupedStore.write(tmp_path / "s", make_samples())
    victim = tmp_path / "s" / "group_0002_16x24.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CorruptedStoreError, match=r"group_0002_16x24\.safetensors.*truncated"):
        GroupedStore(tmp_path / "s", verify=False)
    victim.unlink()
    with pytest.raises(CorruptedStoreError, match=r"group_0002_16x24\.safetensors.*missing"):
        GroupedStore(tmp_path / "s", verify=False)


def test_refuses_to_overwrite(tmp_path):
    samples = make_samples()
    GroupedStore.write(tmp_path / "s", samples[:5])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        GroupedStore.write(tmp_path / "s", samples)
    assert len(GroupedStore(tmp_path / "s")) == 5
    assert len(GroupedStore.write(tmp_path / "s", samples, overwrite=True)) == len(samples)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a GroupedStore"):
        GroupedStore.write(tmp_path / "other", samples, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "s"]  # no temp dirs left


def test_failed_write_leaves_existing_store_and_no_temp(tmp_path):
    samples = make_samples()
    GroupedStore.write(tmp_path / "s", samples[:5])

    def broken():
        yield from samples[:7]
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        GroupedStore.write(tmp_path / "s", broken(), overwrite=True)
    assert len(GroupedStore(tmp_path / "s")) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_bad_samples_rejected_before_writing(tmp_path):
    samples = make_samples(5)
    with GroupedStoreWriter(tmp_path / "s") as w:
        w.add(samples[0])
        with pytest.raises(TypeError, match="state: expected dtype float16, got float32"):
            w.add({**samples[0], "state": samples[0]["state"].float()})
        with pytest.raises(ValueError, match=r"target: expected \(3,\) in group \(16, 16\), got \(4,\)"):
            w.add({**samples[0], "target": np.zeros(4, dtype=np.int16)})
        with pytest.raises(ValueError, match="sample: expected fields"):
            w.add({k: v for k, v in samples[0].items() if k != "flag"})
        with pytest.raises(TypeError, match="trajectory: expected dtype str"):
            w.add({**samples[0], "trajectory": np.int32(3)})
    assert len(GroupedStore(tmp_path / "s")) == 1  # rejected samples left no trace
    with pytest.raises(TypeError, match="extra: expected an array"), GroupedStoreWriter(tmp_path / "t") as w:
        w.add({"x": np.zeros((2, 2)), "extra": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # the aborted writer removed its temp dir


def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_open_is_lazy_rss_only_grows_when_data_is_read(tmp_path):
    block = np.ones((4, 64, 64), dtype=np.float16)
    n = 2000  # 2000 * 32 KiB = 62.5 MiB of float16 in one group
    GroupedStore.write(tmp_path / "big", ({"state": block, "id": i} for i in range(n)), buffer_bytes=8 << 20)
    gc.collect()
    before = rss_bytes()
    store = GroupedStore(tmp_path / "big")  # verify=True: sha256 streams the file
    one = store[n // 2]
    part = store.get_batch([1, 7, 1500])
    opened = rss_bytes()
    assert one["id"] == n // 2 and part["state"].shape == (3, 4, 64, 64)
    assert opened - before < 8 << 20, f"opening grew RSS by {(opened - before) >> 20} MiB"
    assert len(pickle.dumps(store)) < 10_000  # workers receive the index, not the data
    everything = store.column("state")  # positive control: reading everything is visible
    assert bool((everything == 1).all())
    assert rss_bytes() - opened > 48 << 20
