import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blockyard.data import BucketBatchSampler, GroupedStore, PaddedDataset

SHAPES = [(16, 16), (24, 24), (16, 24)]


@pytest.fixture
def store(tmp_path):
    samples = []
    for i in range(40):
        h, w = SHAPES[i % 3]
        state = torch.arange(4 * h * w, dtype=torch.float32).reshape(4, h, w).half() + 1  # no zeros inside
        samples.append({"state": state, "target": np.array([h - 1, w - 1, i % 12]), "id": i, "run": f"r{i % 5}"})
    return GroupedStore.write(tmp_path / "s", samples)


def test_pads_bottom_right_with_zeros_and_masks_padding(store):
    ds = PaddedDataset(store, 32)
    for i in range(len(store)):
        item, raw = ds[i], store[i]
        h, w = raw["state"].shape[-2:]
        assert item["state"].shape == (4, 32, 32) and item["state"].dtype == torch.float16
        assert torch.equal(item["state"][:, :h, :w], raw["state"])
        assert not item["state"][:, h:, :].any() and not item["state"][:, :, w:].any()
        mask = item["pad_mask"]
        assert mask.dtype == torch.bool and mask.shape == (32, 32)
        assert int((~mask).sum()) == h * w and not mask[:h, :w].any()  # True = masked = padding
        assert torch.equal(item["target"], raw["target"]) and item["run"] == raw["run"]
        y, x = item["target"][:2].tolist()
        assert not mask[y, x]  # stored coordinates stay inside the unmasked grid


def test_rectangular_size_and_natural_resolution(store):
    ds = PaddedDataset(store, (24, 40))
    assert ds[2]["state"].shape == (4, 24, 40)
    natural = PaddedDataset(store, None)
    for i in range(3):
        item = natural[i]
        assert item["state"].shape == store[i]["state"].shape
        assert item["pad_mask"].shape == item["state"].shape[-2:] and not item["pad_mask"].any()


def test_rejects_size_smaller_than_a_group(store):
    with pytest.raises(ValueError, match=r"size: expected at least \(24, 24\)"):
        PaddedDataset(store, 20)
    with pytest.raises(ValueError, match="size: expected an int or"):
        PaddedDataset(store, (8, 8, 8))
    with pytest.raises(ValueError, match="fields:"):
        PaddedDataset(store, 32, fields=["run"])


def test_transform_runs_at_natural_resolution_before_padding(store):
    def hflip(sample):
        sample["state"] = sample["state"].flip(-1)
        return sample

    ds = PaddedDataset(store, 32, transform=hflip)
    raw = store[1]
    h, w = raw["state"].shape[-2:]
    item = ds[1]
    assert torch.equal(item["state"][:, :h, :w], raw["state"].flip(-1))  # grid still at the top-left
    assert not item["pad_mask"][:h, :w].any()


def test_indices_select_and_repeat(store):
    ds = PaddedDataset(store, 32, indices=[3, 3, 0])
    assert len(ds) == 3 and ds[0]["id"] == ds[1]["id"] == store[3]["id"]
    np.testing.assert_array_equal(ds.group_ids, store.group_ids[[3, 3, 0]])


def test_batched_fetch_equals_per_item(store):
    ds = PaddedDataset(store, 32)
    group = store.groups[1]
    items = [group.start + 2, group.start, group.start + 2]
    for fast, slow in zip(ds.__getitems__(items), [ds[i] for i in items]):
        assert fast.keys() == slow.keys()
        for k in fast:
            assert torch.equal(fast[k], slow[k]) if torch.is_tensor(fast[k]) else fast[k] == slow[k]


def test_pickled_dataset_reopens_lazily(store):
    ds = PaddedDataset(store, 32)
    expected = ds[5]  # parent process has now mapped a file
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.store._maps == {}
    assert torch.equal(clone[5]["state"], expected["state"])


def test_dataloader_two_workers_bucketed(store):
    ds = PaddedDataset(store, None)  # natural resolution: only bucketing makes batches stackable
    ds[0]  # the parent maps a file before forking; workers must still read correctly
    sampler = BucketBatchSampler(ds, batch_size=4, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["state"].shape[0] == batch["pad_mask"].shape[0] == len(batch["id"])
        assert len({tuple(s) for s in batch["target"][:, :2].tolist()}) == 1  # one grid size per batch
        seen += batch["id"].tolist()
    assert sorted(seen) == list(range(len(store)))
    assert len(loader) == len(sampler) == 12  # ceil(14/4) + ceil(13/4) + ceil(13/4)

