"""Position balancing by border distance, and reproducible stratified / grouped splits."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["Split", "balanced_indices", "group_split", "layer_index", "stratified_split"]


class Split(NamedTuple):
    """Sorted index arrays of a two-way split."""

    train: np.ndarray
    val: np.ndarray


def layer_index(y: Any, x: Any, height: Any, width: Any) -> Any:
    r"""Distance of cell ``(y, x)`` to the nearest border of an ``height x width`` grid.

    .. math:: \ell = \min(y,\ x,\ h - 1 - y,\ w - 1 - x)

    Layer 0 is the outer ring. Vectorised: any argument may be a Python int, a numpy array
    or a torch tensor (broadcast together; per-sample grid sizes are fine). Returns a tensor if
    any argument is a tensor, else a numpy array (or numpy integer for scalar inputs). Which
    cell of a multi-cell object to use (the seed used an op window's top-left anchor) is the
    caller's choice.

    Shapes:
        - y, x, height, width: broadcastable
        - output: the broadcast shape
    """
    args = (y, x, height, width)
    if any(isinstance(a, torch.Tensor) for a in args):
        ref = next(a for a in args if isinstance(a, torch.Tensor))
        y, x, height, width = (torch.as_tensor(a, device=ref.device) for a in args)
        return torch.minimum(torch.minimum(y, x), torch.minimum(height - 1 - y, width - 1 - x))
    y, x, height, width = (np.asarray(a) for a in args)
    return np.minimum(np.minimum(y, x), np.minimum(height - 1 - y, width - 1 - x))


def _codes(keys: Any) -> np.ndarray:
    if isinstance(keys, torch.Tensor):
        keys = keys.cpu().numpy()
    arr = np.asarray(keys)
    if arr.ndim == 1 and arr.dtype.kind in "iubU":
        return np.unique(arr, return_inverse=True)[1].reshape(-1)
    table: dict[Hashable, int] = {}
    return np.array([table.setdefault(k, len(table)) for k in keys], dtype=np.int64)


def balanced_indices(layers: Any, max_factor: float = 4, seed: int = 0, groups: Any = None) -> np.ndarray:
    """Oversample rare layers towards the most populated one, at most ``max_factor`` times.

    Within each group (all samples if ``groups`` is None), with ``M`` the count of the most
    populated layer (for position targets on grids this is layer 0, the border), a layer with
    ``c`` samples gets ``n = min(M - c, floor(c * (max_factor - 1)))`` extra copies, so its
    count becomes ``min(M, max_factor * c)``. Extras are drawn as whole passes over the layer
    plus a random subset without replacement (every sample is repeated ``n // c`` or
    ``n // c + 1`` times, lower variance than the seed's sampling with replacement), from a
    generator seeded with ``seed`` (the seed's version was unseeded).

    Apply it to the training split only: oversampling before splitting leaks duplicates into
    validation.

    Args:
        layers: ``(N,)`` layer index (or any stratum label) of every sample.
        max_factor: cap on a layer's growth ratio (>= 1; 1 means no oversampling).
        seed: seed of the draw.
        groups: optional ``(N,)`` group of every sample (e.g. grid size); balancing is per group.

    Returns:
        ``(N + extras,)`` int64: ``arange(N)`` followed by the extra indices.
    """
    layer_codes = _codes(layers)
    n = layer_codes.size
    if max_factor < 1:
        raise ValueError(f"max_factor: expected >= 1, got {max_factor}")
    group_codes = np.zeros(n, dtype=np.int64) if groups is None else _codes(groups)
    if group_codes.shape != (n,):
        raise ValueError(f"groups: expected ({n},), got {group_codes.shape}")
    rng = np.random.default_rng(seed)
    extras = []
    for g in np.unique(group_codes):
        in_group = np.flatnonzero(group_codes == g)
        _, inverse, counts = np.unique(layer_codes[in_group], return_inverse=True, return_counts=True)
        top = counts.max()
        for v, c in enumerate(counts.tolist()):
            n_extra = min(top - c, int(np.floor(c * (max_factor - 1) + 1e-9)))
            if n_extra <= 0:
                continue
            members = in_group[inverse.reshape(-1) == v]
            full, rest = divmod(n_extra, c)
            extras.append(np.tile(members, full))
            extras.append(rng.choice(members, size=rest, replace=False))
    return np.concatenate([np.arange(n, dtype=np.int64), *extras]).astype(np.int64)


def stratified_split(keys: Any, val_fraction: float, seed: int = 0) -> Split:
    """Split indices so each key keeps its share of the validation set.

    The validation set has ``round(N * val_fraction)`` items; each key gets ``floor`` of its
    exact share ``n_k * val_fraction``, and the leftover items go to the keys with the largest
    fractional parts (ties broken by the seeded generator), so every key is within one item of
    its exact share. Which items of a key go to validation is drawn from ``seed``.

    Args:
        keys: ``(N,)`` stratum of every item (ints, strings, tuples...).
        val_fraction: in [0, 1].
        seed: seed of the draw.

    Returns:
        ``Split(train, val)``: sorted int64 index arrays partitioning ``range(N)``.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction: expected in [0, 1], got {val_fraction}")
    codes = _codes(keys)
    rng = np.random.default_rng(seed)
    counts = np.bincount(codes) if codes.size else np.zeros(0, dtype=np.int64)
    exact = counts * val_fraction
    n_val = np.floor(exact + 1e-9).astype(np.int64)
    leftover = round(codes.size * val_fraction) - int(n_val.sum())
    if leftover > 0:
        frac = exact - n_val
        order = np.lexsort((rng.random(len(counts)), -frac))
        n_val[order[:leftover]] += 1
    val = [rng.permutation(np.flatnonzero(codes == k))[:n_val[k]] for k in range(len(counts))]
    val_idx = np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *val])).astype(np.int64)
    is_val = np.zeros(codes.size, dtype=bool)
    is_val[val_idx] = True
    return Split(np.flatnonzero(~is_val).astype(np.int64), val_idx)


def group_split(groups: Sequence[Hashable] | Any, fractions: Sequence[float], seed: int = 0,
                strata: Any = None) -> tuple[np.ndarray, ...]:
    """Split items so that no group (e.g. trajectory) lands in two parts.

    The distinct groups are shuffled with ``seed`` and assigned in that order to the parts,
    cutting where the cumulative item count passes each boundary of ``fractions`` (so parts
    hold about ``fraction * N`` items, up to one group's size). With ``strata`` (one label per
    item, constant within a group, e.g. the zone pattern) this is done within each stratum, so
    each part keeps every stratum's share.

    Args:
        groups: ``(N,)`` group of every item.
        fractions: one fraction per part, summing to 1, e.g. ``(0.8, 0.1, 0.1)``.
        seed: seed of the shuffle.
        strata: optional ``(N,)`` stratum of every item.

    Returns:
        one sorted int64 index array per part, together a partition of ``range(N)``.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or np.any(fractions < 0) or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions: expected non-negative values summing to 1, got {fractions.tolist()}")
    codes = _codes(groups)
    strata_codes = np.zeros(codes.size, dtype=np.int64) if strata is None else _codes(strata)
    if strata_codes.shape != codes.shape:
        raise ValueError(f"strata: expected ({codes.size},), got {strata_codes.shape}")
    if codes.size and np.unique(np.stack([codes, strata_codes]), axis=1).shape[1] != np.unique(codes).size:
        raise ValueError("strata: expected one stratum per group, got a group with several")
    rng = np.random.default_rng(seed)
    part_of_group = np.zeros(codes.max() + 1 if codes.size else 0, dtype=np.int64)
    bounds = np.cumsum(fractions)[:-1]
    for s in np.unique(strata_codes):
        items = codes[strata_codes == s]
        uniq, sizes = np.unique(items, return_counts=True)
        perm = rng.permutation(len(uniq))
        # Cut at each group's midpoint so a boundary falls where it best matches the fraction.
        mid = (np.cumsum(sizes[perm]) - sizes[perm] / 2) / items.size
        part_of_group[uniq[perm]] = np.searchsorted(bounds, mid, side="right")
    part = part_of_group[codes]
    return tuple(np.flatnonzero(part == k).astype(np.int64) for k in range(fractions.size))
