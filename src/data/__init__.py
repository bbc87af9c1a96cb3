"""Storage, datasets, samplers, splits and padding. Every name is re-exported flat here."""

from .balance import Split, balanced_indices, group_split, layer_index, stratified_split
from .padded import PAD_MASK, PaddedDataset
from .samplers import BucketBatchSampler
from .store import CorruptedStoreError, GroupedStore, StoreGroup
from .store_writer import GroupedStoreWriter

__all__ = [
    "PAD_MASK",
    "BucketBatchSampler",
    "CorruptedStoreError",
    "GroupedStore",
    "GroupedStoreWriter",
    "PaddedDataset",
    "Split",
    "StoreGroup",
    "balanced_indices",
    "group_split",
    "layer_index",
    "stratified_split",
]
