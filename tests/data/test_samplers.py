from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockyard.data import BucketBatchSampler, rank_batches


def run_epoch(groups, world_size, epoch=0, **kw):
    """Every rank's batches for one epoch, ranks simulated in one process."""
    out = []
    for rank in range(world_size):
        sampler = BucketBatchSampler(groups, rank=rank, world_size=world_size, **kw)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)  # __len__ is exact
        out.append(batches)
    return out


def test_two_ranks_cover_every_index_once_and_never_mix_groups():
    groups = ["16x16"] * 10 + ["24x24"] * 7 + ["32x32"] * 12  # 3 + 2 + 3 = 8 batches, no padding
    per_rank = run_epoch(groups, world_size=2, batch_size=4, seed=1)
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(len(groups)))  # exactly once across ranks
    for batches in per_rank:
        for b in batches:
            assert len({groups[i] for i in b}) == 1
    shards = [{i for b in batches for i in b} for batches in per_rank]
    assert not shards[0] & shards[1]  # disjoint shards


def test_uneven_batch_count_is_padded_by_repeating_batches():
    groups = [0] * 4 + [1] * 4 + [2] * 4  # 3 batches of 4 on 2 ranks
    per_rank = run_epoch(groups, world_size=2, batch_size=4, seed=0)
    assert [len(r) for r in per_rank] == [2, 2]  # nobody waits in an all-reduce
    counts = Counter(i for r in per_rank for b in r for i in b)
    assert set(counts) == set(range(12))
    assert sorted(counts.values()) == [1] * 8 + [2] * 4  # exactly one batch repeated


def test_drop_last_drops_incomplete_and_surplus_batches():
    groups = [0] * 9 + [1] * 6 + [2] * 4  # full batches of 4: 2 + 1 + 1 = 4 -> 2 per rank on 2 ranks
    per_rank = run_epoch(groups, world_size=2, batch_size=4, drop_last=True)
    assert [len(r) for r in per_rank] == [2, 2]
    flat = [i for r in per_rank for b in r for i in b]
    assert all(len(b) == 4 for r in per_rank for b in r) and len(set(flat)) == len(flat) == 16
    per_rank = run_epoch(groups, world_size=3, batch_size=4, drop_last=True)  # 4 batches -> 1 each
    assert [len(r) for r in per_rank] == [1, 1, 1]


def test_set_epoch_is_reproducible_and_changes_the_order():
    groups = np.repeat(np.arange(4), 25)
    a = run_epoch(groups, 2, epoch=3, batch_size=5, seed=7)
    b = run_epoch(groups, 2, epoch=3, batch_size=5, seed=7)
    c = run_epoch(groups, 2, epoch=4, batch_size=5, seed=7)
    d = run_epoch(groups, 2, epoch=3, batch_size=5, seed=8)
    assert a == b and a != c and a != d
    assert sorted(i for r in c for bt in r for i in bt) == list(range(100))


def test_no_shuffle_keeps_index_order_group_by_group():
    groups = [1, 0, 1, 0, 1]
    assert list(BucketBatchSampler(groups, batch_size=2, shuffle=False)) == [[1, 3], [0, 2], [4]]


def test_accepts_objects_with_group_ids():
    class Store:
        group_ids = np.array([0, 0, 1])

    assert sorted(map(sorted, BucketBatchSampler(Store(), batch_size=2))) == [[0, 1], [2]]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([0, 1], batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([0, 1], batch_size=1, rank=2, world_size=2)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 23), min_size=1, max_size=6), batch_size=st.integers(1, 7),
       world_size=st.integers(1, 4), drop_last=st.booleans(), epoch=st.integers(0, 5))
def test_invariants_hold_for_any_configuration(sizes, batch_size, world_size, drop_last, epoch):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(0).shuffle(groups)  # groups interleaved in index order
    per_rank = run_epoch(groups, world_size, epoch=epoch, batch_size=batch_size, drop_last=drop_last)
    assert len({len(r) for r in per_rank}) == 1
    batches = [b for r in per_rank for b in r]
    assert all(0 < len(b) <= batch_size and len(set(groups[b])) == 1 for b in batches)
    counts = Counter(i for b in batches for i in b)
    n_batches = sum(s // batch_size if drop_last else -(-s // batch_size) for s in sizes)
    if drop_last:
        assert all(len(b) == batch_size for b in batches) and max(counts.values(), default=1) == 1
    elif n_batches % world_size == 0:
        assert sorted(counts) == list(range(len(groups))) and set(counts.values()) == {1}
    else:
        assert set(counts) == set(range(len(groups)))  # padding repeats, never skips


def test_rank_batches_are_disjoint_equal_and_reproducible():
    per_rank = [rank_batches(103, 5, epoch=3, seed=7, rank=r, world_size=3) for r in range(3)]
    assert all(b.shape == (6, 5) for b in per_rank)  # 103 // 15 = 6 steps on every rank
    rows = torch.cat([b.flatten() for b in per_rank])
    assert len(set(rows.tolist())) == 90 and rows.min() >= 0 and rows.max() < 103  # no row shared
    for step in range(6):  # each global batch is one contiguous slice of one permutation
        joined = torch.cat([b[step] for b in per_rank])
        perm = torch.randperm(103, generator=torch.Generator().manual_seed(7 * 1000 + 3))
        assert torch.equal(joined, perm[step * 15:(step + 1) * 15])
    assert torch.equal(rank_batches(103, 5, 3, 7, 1, 3), per_rank[1])  # same call, same batches
    assert not torch.equal(rank_batches(103, 5, 4, 7, 1, 3), per_rank[1])  # next epoch reshuffles
    with pytest.raises(ValueError, match="batch_size"):
        rank_batches(10, 6, 0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        rank_batches(10, 2, 0, rank=2, world_size=2)
