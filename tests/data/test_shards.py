import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from blockyard.data import BinnedTargets, CorruptedStoreError, ShardDataset, freedman_diaconis_edges, write_shard

GROUPS = [(9, 4), (9, 5), (9, 6), (10, 4), (10, 5), (10, 6)]  # System A's (n, k)


def make_group(count, seed):
    """System A-like samples: P is k x (n-k), side (n, k, m), target an m-height-like float."""
    rng = np.random.default_rng(seed)
    mats, side, target = [], [], []
    for _ in range(count):
        n, k = GROUPS[rng.integers(len(GROUPS))]
        mats.append(rng.uniform(-100, 100, (k, n - k)).astype(np.float32))
        side.append((n, k, rng.integers(2, n - k + 1)))
        target.append(2.0 ** rng.uniform(3, 30))
    return mats, np.array(side, dtype=np.float32), np.array(target)


@pytest.fixture
def folder(tmp_path):
    """Three shards of 5, 17 and 1 samples; the second written as a padded tensor plus shapes."""
    originals = []
    for s, count in enumerate((5, 17, 1)):
        mats, side, target = make_group(count, s)
        flag = np.arange(count, dtype=np.int16) + 100 * s
        if s == 1:
            padded = np.zeros((count, 6, 6), dtype=np.float32)
            for i, m in enumerate(mats):
                padded[i, : m.shape[0], : m.shape[1]] = m
            shapes = np.array([m.shape for m in mats])
            write_shard(tmp_path / "d", torch.from_numpy(padded), side, target, shapes=shapes, extras={"flag": flag})
        else:
            write_shard(tmp_path / "d", mats, side, target, pad_to=(6, 6), extras={"flag": flag})
        originals += [(m, side[i], target[i], flag[i]) for i, m in enumerate(mats)]
    return tmp_path / "d", originals


def check_item(item, original):
    mat, side, target, flag = original
    k, nk = mat.shape
    assert item["matrix"].shape == (6, 6) and item["matrix"].dtype == torch.float32
    assert torch.equal(item["matrix"][:k, :nk], torch.from_numpy(mat))
    assert not item["matrix"][k:].any() and not item["matrix"][:, nk:].any()
    mask = item["pad_mask"]
    assert mask.dtype == torch.bool and int((~mask).sum()) == k * nk and not mask[:k, :nk].any()  # True = padding
    assert item["shape"].tolist() == [k, nk] and item["shape"].dtype == torch.int64
    assert torch.equal(item["side"], torch.from_numpy(side))
    assert item["target"].dtype == torch.float64 and float(item["target"]) == target  # exact
    assert item["flag"].dtype == torch.int16 and int(item["flag"]) == flag


def test_round_trip_across_shards_of_different_sizes(folder):
    path, originals = folder
    ds = ShardDataset(path)
    assert len(ds) == 23 and [s["count"] for s in ds.shards] == [5, 17, 1]
    assert ds.max_shape == (6, 6) and ds.side_dim == 3 and ds.extras == ("flag",)
    for i, original in enumerate(originals):
        check_item(ds[i], original)
    check_item(ds[-1], originals[-1])
    assert ds.shard_of([0, 4, 5, 21, 22]).tolist() == [0, 0, 1, 1, 2]
    torch.testing.assert_close(ds.targets, torch.tensor([o[2] for o in originals], dtype=torch.float64))


def test_batched_reads_equal_items_in_any_order(folder):
    ds = ShardDataset(folder[0], max_open=1)  # also exercises closing least-recently-used maps
    idx = [22, 3, 10, 3, 0, 21]
    batch = ds.get_batch(idx)
    items = ds.__getitems__(idx)
    for j, i in enumerate(idx):
        for key, value in ds[i].items():
            assert torch.equal(batch[key][j], value), key
            assert torch.equal(items[j][key], value), key
    assert len(ds._maps) <= 1


def test_index_and_files_are_standard(folder):
    path, _ = folder
    index = json.loads((path / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard_{i:05d}.safetensors" for i in range(3)]
    assert index["fields"]["matrix"] == {"dtype": "float32", "shape": [6, 6]}
    assert index["num_samples"] == 23 and all(len(s["sha256"]) == 64 for s in index["shards"])
    with safe_open(str(path / "shard_00001.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == {"matrix", "shape", "side", "target", "flag"}
        matrix = fh.get_tensor("matrix")
    assert torch.equal(matrix, ShardDataset(path).get_batch(range(5, 22))["matrix"])


def test_dataloader_with_two_workers_reads_every_sample_once(folder):
    path, originals = folder
    ds = ShardDataset(path)
    ds[0]  # open a map in the parent: it must not travel to the workers
    assert len(ds._maps) == 1 and len(pickle.loads(pickle.dumps(ds))._maps) == 0
    assert len(pickle.dumps(ds)) < 5_000
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0),
                        timeout=60)
    seen = {}
    for batch in loader:
        assert batch["matrix"].shape[1:] == (6, 6) and batch["pad_mask"].shape[1:] == (6, 6)
        for j in range(len(batch["target"])):
            seen[int(batch["flag"][j])] = {k: v[j] for k, v in batch.items()}  # flag is unique per sample
    assert len(seen) == 23
    for original in originals:
        check_item(seen[int(original[3])], original)


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_shard_is_named(folder, where):
    path, _ = folder
    victim = path / "shard_00001.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) - 50 if where == "data" else 30] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptedStoreError, match=r"shard_00001\.safetensors.*sha256"):
        ShardDataset(path)
    lazy = ShardDataset(path, verify="lazy")
    assert lazy[0]["matrix"].shape == (6, 6)  # intact shards still read
    with pytest.raises(CorruptedStoreError, match=r"shard_00001\.safetensors.*sha256"):
        lazy[5]
    if where == "header":  # without any hashing the damage still surfaces, named, on first access
        with pytest.raises(CorruptedStoreError, match=r"shard_00001\.safetensors"):
            ShardDataset(path, verify=False)[5]


def test_truncated_or_missing_shard_is_named_without_verify(folder):
    path, _ = folder
    victim = path / "shard_00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-3])
    with pytest.raises(CorruptedStoreError, match=r"shard_00002\.safetensors: size"):
        ShardDataset(path, verify=False)
    victim.unlink()
    with pytest.raises(CorruptedStoreError, match=r"shard_00002\.safetensors: shard file is missing"):
        ShardDataset(path, verify=False)
    (path / "index.json").write_text("{not json")
    with pytest.raises(CorruptedStoreError, match=r"index\.json: unreadable index"):
        ShardDataset(path)


def test_overwrite_refused_and_orphans_skipped(folder):
    path, _ = folder
    before = (path / "index.json").read_bytes()
    old = (path / "shard_00001.safetensors").read_bytes()
    mats, side, target = make_group(3, 9)
    with pytest.raises(FileExistsError, match=r"shard_00001\.safetensors: shard already exists"):
        write_shard(path, mats, side, target, pad_to=(6, 6), extras={"flag": np.zeros(3, np.int16)},
                    name="shard_00001")
    assert (path / "index.json").read_bytes() == before and (path / "shard_00001.safetensors").read_bytes() == old
    (path / "shard_00003.safetensors").write_bytes(b"left by a crashed writer")
    new = write_shard(path, mats, side, target, pad_to=(6, 6), extras={"flag": np.zeros(3, np.int16)})
    assert new.name == "shard_00004.safetensors"
    assert (path / "shard_00003.safetensors").read_bytes() == b"left by a crashed writer"
    ds = ShardDataset(path)
    assert len(ds) == 26 and [s["file"] for s in ds.shards][-1] == "shard_00004.safetensors"
    assert sorted(p.name for p in path.iterdir() if ".tmp-" in p.name) == []


def test_schema_mismatch_between_shards_is_refused(folder):
    path, _ = folder
    mats, side, target = make_group(2, 7)
    flag = {"flag": np.zeros(2, np.int16)}
    cases = [
        ({"pad_to": (7, 6), "extras": flag}, r"matrix: expected \{'dtype': 'float32', 'shape': \[6, 6\]\}"),
        ({"pad_to": (6, 6)}, "flag: expected"),
        ({"pad_to": (6, 6), "extras": {"flag": np.zeros(2, np.int32)}}, "flag: expected"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            write_shard(path, mats, side, target, **kwargs)
    with pytest.raises(ValueError, match="side: expected"):
        write_shard(path, mats, side[:, :2], target, pad_to=(6, 6), extras=flag)
    assert len(ShardDataset(path)) == 23


def test_bad_inputs_are_named(tmp_path):
    p = tmp_path / "d"
    good = np.zeros((2, 3, 3), np.float32)
    side, target = np.zeros((2, 3), np.float32), np.ones(2)
    cases = [
        ((np.zeros((3, 3), np.float32), side, target), {}, ValueError, r"matrices: expected \(S, Kmax, Nmax\)"),
        ((good, side[:, 0], target), {}, ValueError, r"side: expected \(2, side_dim\), got \(2,\)"),
        ((good, side, target[:, None]), {}, ValueError, r"targets: expected \(2,\), got \(2, 1\)"),
        ((good, side, target), {"shapes": np.ones((2, 3), int)}, ValueError, r"shapes: expected \(2, 2\) integers"),
        ((good, side, target), {"shapes": [[3, 4], [1, 1]]}, ValueError, "shapes: expected 1 <= k <= 3"),
        ((np.ones((2, 3, 3), np.float32), side, target), {"shapes": [[3, 3], [2, 3]]}, ValueError,
         r"matrices: sample 1 has nonzero values outside its shape \[2, 3\]"),
        ((good, side, target), {"extras": {"target": target}}, ValueError, "extras: name 'target' is reserved"),
        ((good, side, target), {"extras": {"w": np.ones(3)}}, ValueError, r"extras\['w'\]: expected \(2, \.\.\.\)"),
        ((good[:0], side[:0], target[:0]), {}, ValueError, "matrices: expected at least one sample"),
        ((good.astype(np.int32), side, target), {}, TypeError, "matrices: expected a float dtype"),
        ((good, side, target), {"pad_to": (2, 3)}, ValueError, r"pad_to: expected at least \(3, 3\)"),
        (([np.zeros((2, 3)), np.zeros((2, 3), np.float32)], side, target), {}, ValueError, r"matrices\[1\]"),
        ((good, side, target), {"name": "../escape"}, ValueError, "name: expected a plain file name"),
        ((good, side, ["a", "b"]), {}, TypeError, "targets: expected a tensor or an array of numbers"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            write_shard(p, *args, **kwargs)
    assert not (p / "index.json").exists()  # every rejection happened before anything was written
    with pytest.raises(FileNotFoundError, match="not a ShardDataset"):
        ShardDataset(p)
    write_shard(p, good, side, target)
    ds = ShardDataset(p)
    with pytest.raises(IndexError, match="index: out of range"):
        ds[2]
    with pytest.raises(ValueError, match="verify: expected True, False or 'lazy'"):
        ShardDataset(p, verify="yes")


APPEND = """
import pathlib, sys, time
import numpy as np
from blockyard.data import write_shard
rng = np.random.default_rng(int(sys.argv[2]))
pathlib.Path(sys.argv[1] + f".ready{sys.argv[2]}").touch()
while not all(pathlib.Path(sys.argv[1] + f".ready{i}").exists() for i in range(2)):  # start together
    time.sleep(0.005)
for _ in range(20):
    k = int(rng.integers(4, 7))
    write_shard(sys.argv[1], [rng.uniform(-1, 1, (k, 10 - k)).astype(np.float32) for _ in range(2)],
                np.zeros((2, 3), np.float32), np.ones(2), pad_to=(6, 6))
"""


def test_concurrent_writers_lose_no_shard(tmp_path):
    # Separate interpreters (not fork: forking a process that has used torch's thread pool can hang).
    procs = [subprocess.Popen([sys.executable, "-c", APPEND, str(tmp_path / "d"), str(s)]) for s in range(2)]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0]
    ds = ShardDataset(tmp_path / "d")
    assert len(ds.shards) == 40 and len(ds) == 80
    assert len({s["file"] for s in ds.shards}) == 40


def test_binned_targets_over_shards_use_the_vectorised_column(folder):
    ds = ShardDataset(folder[0])
    binned = BinnedTargets(ds, freedman_diaconis_edges(ds.targets, log2=True), log2=True)
    assert binned.labels.tolist() == [int(binned[i]["label"]) for i in range(len(ds))]
    assert torch.equal(binned[3]["target"], ds[3]["target"])  # raw target kept
