"""Storage, datasets, samplers, splits and padding. Every name is re-exported flat here."""

from .atomic import write_json_atomic
from .balance import Split, balanced_indices, group_split, layer_index, stratified_split
from .binning import BinnedTargets, bin_index, freedman_diaconis_edges
from .lock import LockHeld, file_lock, hold_lock, release_lock
from .padded import PAD_MASK, PaddedDataset
from .samplers import BucketBatchSampler, rank_batches
from .shards import ShardDataset, write_shard
from .store import CorruptedStoreError, GroupedStore, StoreGroup
from .store_writer import GroupedStoreWriter

__all__ = [
    "PAD_MASK",
    "BinnedTargets",
    "BucketBatchSampler",
    "CorruptedStoreError",
    "GroupedStore",
    "GroupedStoreWriter",
    "LockHeld",
    "PaddedDataset",
    "ShardDataset",
    "Split",
    "StoreGroup",
    "balanced_indices",
    "bin_index",
    "file_lock",
    "freedman_diaconis_edges",
    "group_split",
    "hold_lock",
    "layer_index",
    "rank_batches",
    "release_lock",
    "stratified_split",
    "write_json_atomic",
    "write_shard",
]
