"""Regression as classification: Freedman-Diaconis bin edges and a dataset wrapper adding bin labels.

Freedman & Diaconis, "On the histogram as a density estimator: L2 theory", 1981.
https://doi.org/10.1007/BF01025868
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["BinnedTargets", "bin_index", "freedman_diaconis_edges"]


def _as_float64(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"values: expected an array of real numbers, got {type(values).__name__}") from None
    return arr.reshape(-1)


def freedman_diaconis_edges(values: Any, *, max_bins: int | None = None, log2: bool = False) -> torch.Tensor:
    r"""Equal-width bin edges over ``[min, max]`` with the Freedman-Diaconis width.

    .. math::
        w = 2\,\mathrm{IQR}\,n^{-1/3}, \qquad C = \lceil (\max - \min) / w \rceil,
        \qquad \text{edges} = \mathrm{linspace}(\min, \max, C + 1)

    with the IQR from numpy's default (linear) percentiles. This is exactly the rule of
    ``numpy.histogram_bin_edges(values, bins="fd")``: the bins tile ``[min, max]`` so the actual
    width is ``(max - min) / C <= w``, the first edge is the minimum and the last edge is the
    maximum (included in the last bin by :func:`bin_index`). The one difference: numpy raises
    the width to 1 for integer-dtype data, while here every input is converted to float64 first.
    System A's classifier used this rule on all 840k ``log2 h`` (w = 0.1073, 288 bins over
    [3.142, 34.020]).

    Degenerate inputs raise instead of returning numpy's single bin: fewer than 2 values, any
    NaN or inf, all values equal, or an IQR of 0 (more than half the values tied: the rule has
    no width; pick a bin count by hand and use ``torch.linspace``).

    Args:
        values: targets, any shape (flattened), tensor, array or sequence.
        max_bins: cap on ``C`` (the width grows instead); ``None`` = no cap.
        log2: compute the edges of ``log2(values)`` (values must be > 0); the edges are then in
            log2 space, as :class:`BinnedTargets` with ``log2=True`` expects.

    Returns:
        ``(C + 1,)`` float64 CPU tensor, strictly increasing.

    Shapes:
        - values: ``(*)`` with at least 2 elements
        - output: ``(C + 1,)``
    """
    if max_bins is not None and (isinstance(max_bins, bool) or not isinstance(max_bins, (int, np.integer))
                                 or max_bins < 1):
        raise ValueError(f"max_bins: expected a positive int or None, got {max_bins!r}")
    x = _as_float64(values)
    if x.size < 2:
        raise ValueError(f"values: expected at least 2 values, got {x.size}")
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"values: expected finite numbers, got {bad} NaN/inf of {x.size}")
    if log2:
        if x.min() <= 0:
            raise ValueError(f"values: expected values > 0 with log2=True, got min {x.min()}")
        x = np.log2(x)
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        raise ValueError(f"values: all {x.size} values equal {lo}; there is nothing to bin")
    q75, q25 = np.percentile(x, [75, 25])
    width = 2.0 * float(q75 - q25) * x.size ** (-1.0 / 3.0)
    if width <= 0:
        raise ValueError(f"values: interquartile range is 0 (over half of the {x.size} values are tied), "
                         "so the Freedman-Diaconis width is 0; choose the number of bins by hand")
    count = math.ceil((hi - lo) / width)
    if max_bins is not None:
        count = min(count, int(max_bins))
    return torch.from_numpy(np.linspace(lo, hi, count + 1))


def bin_index(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    r"""Bin of each value: ``clip(digitize(values, edges) - 1, 0, C - 1)``, vectorised.

    Bin ``i`` is ``[edges[i], edges[i+1])``, the last bin also holds ``edges[-1]``. Values below
    the first edge go to bin 0 and values above the last edge to bin ``C - 1`` (clamped, never
    an out-of-range class); NaN also lands in the last bin, so reject NaN before calling (as
    :class:`BinnedTargets` does). Runs on ``values``' device without a host sync.

    Args:
        values: real values (already in the edges' space, e.g. log2).
        edges: ``(C + 1,)`` increasing edges, ``C >= 1``.

    Shapes:
        - values: ``(*)``
        - edges: ``(C + 1,)``
        - output: ``(*)`` int64
    """
    if edges.dim() != 1 or edges.numel() < 2:
        raise ValueError(f"edges: expected (C + 1,) with C >= 1, got {tuple(edges.shape)}")
    if not values.is_floating_point():
        values = values.double()
    edges = edges.to(device=values.device, dtype=torch.promote_types(values.dtype, edges.dtype))
    # bucketize(right=True) is np.digitize's convention: edges[i-1] <= x < edges[i] -> i.
    index = torch.bucketize(values.to(edges.dtype), edges, right=True) - 1
    return index.clamp_(0, edges.numel() - 2)


class BinnedTargets(Dataset):
    r"""Wrap a dataset to add an integer class ``label`` (the target's bin) and keep the raw target.

    ``label = clip(digitize(t, edges) - 1, 0, C - 1)`` with ``t = target`` or ``log2(target)``
    (System A's ``ClassifWrapper``); a target below the first edge is class 0 and one above the
    last edge class ``C - 1`` (clamped). A NaN target raises ``ValueError``.

    Items: the base dataset's items are dicts (``GroupedStore``, ``PaddedDataset``,
    ``ShardDataset``) and get one more key ``label_key``; or tuples/lists, when ``target_key`` is
    an int position, and get the label appended as the last element. Targets must be scalars
    (one element). ``DataLoader`` batches go through the base's ``__getitems__`` when it has one.

    Whole-dataset labels (:attr:`labels`, e.g. for class weights or a stratified split) are
    computed in one vectorised pass when the base dataset exposes its targets, as
    ``column(target_key)`` (``GroupedStore``, ``ShardDataset``) or a ``targets`` attribute;
    otherwise every item is read once. Decoding a class back to a value uses the bin midpoint
    (:attr:`bin_centers`), in log2 space with ``log2=True`` (then ``2 ** center``).

    Args:
        dataset: the map-style dataset to wrap.
        edges: ``(C + 1,)`` increasing bin edges, e.g. from :func:`freedman_diaconis_edges`.
        target_key: dict key (or tuple position) of the scalar target.
        label_key: dict key for the class label.
        log2: bin ``log2(target)`` (edges in log2 space).

    Shapes:
        - ``item[label_key]``: ``()`` int64 in ``[0, C)``
        - ``item[target_key]``: unchanged
        - :attr:`labels`: ``(len(dataset),)`` int64
        - :attr:`bin_centers`: ``(C,)`` float64
    """

    def __init__(self, dataset: Dataset, edges: torch.Tensor | np.ndarray | Sequence[float], *,
                 target_key: str | int = "target", label_key: str = "label", log2: bool = False) -> None:
        edges_t = (edges.detach().cpu() if isinstance(edges, torch.Tensor)
                   else torch.from_numpy(np.asarray(edges, dtype=np.float64))).double()
        if edges_t.dim() != 1 or edges_t.numel() < 2:
            raise ValueError(f"edges: expected (C + 1,) with C >= 1, got {tuple(edges_t.shape)}")
        if not bool(torch.isfinite(edges_t).all()) or not bool((edges_t[1:] > edges_t[:-1]).all()):
            raise ValueError("edges: expected finite, strictly increasing values")
        if not isinstance(target_key, (str, int)) or isinstance(target_key, bool):
            raise TypeError(f"target_key: expected a str or an int, got {type(target_key).__name__}")
        self.dataset = dataset
        self.edges = edges_t
        self.target_key = target_key
        self.label_key = label_key
        self.log2 = log2
        self._labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.edges.numel() - 1

    @property
    def bin_centers(self) -> torch.Tensor:
        """``(C,)`` float64 midpoints of the bins (log2 space with ``log2=True``)."""
        return (self.edges[:-1] + self.edges[1:]) / 2

    def __len__(self) -> int:
        return len(self.dataset)

    def label_of(self, targets: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """Class of raw target value(s) (before the optional log2), same shape, int64."""
        t = targets if isinstance(targets, torch.Tensor) else torch.from_numpy(np.asarray(targets))
        t = t.double() if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16) else t
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{self.target_key}: NaN target has no bin")
        if self.log2:
            if bool((t < 0).any()):
                raise ValueError(f"{self.target_key}: expected targets >= 0 with log2=True, got min {float(t.min())}")
            t = torch.log2(t)  # 0 -> -inf -> class 0
        return bin_index(t, self.edges)

    def decode(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Value of each class (bin midpoint, ``2 ** midpoint`` with ``log2=True``) on ``labels``' device."""
        table = torch.exp2(self.bin_centers) if self.log2 else self.bin_centers  # float64 on the CPU
        return table.to(dtype).to(labels.device)[labels]

    def _target(self, item: Any) -> Any:
        if isinstance(self.target_key, str):
            if not isinstance(item, Mapping):
                raise TypeError(f"dataset: items must be dicts for target_key={self.target_key!r}, "
                                f"got {type(item).__name__}")
            if self.label_key in item:
                raise ValueError(f"label_key: {self.label_key!r} is already a key of the dataset's items")
            return item[self.target_key]
        if not isinstance(item, (tuple, list)):
            raise TypeError(f"dataset: items must be tuples for target_key={self.target_key}, "
                            f"got {type(item).__name__}")
        return item[self.target_key]

    def _attach(self, item: Any, label: torch.Tensor) -> Any:
        if isinstance(self.target_key, str):
            return {**item, self.label_key: label}
        return (*item, label)

    def _scalar(self, target: Any) -> torch.Tensor:
        # Through numpy so a Python float stays float64 (torch.as_tensor would round it to float32).
        t = target if isinstance(target, torch.Tensor) else torch.from_numpy(np.asarray(target))
        if t.numel() != 1:
            raise ValueError(f"{self.target_key}: expected a scalar target (1 element), got shape {tuple(t.shape)}")
        return t.reshape(())

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return self._attach(item, self.label_of(self._scalar(self._target(item))))

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Batched fetch for ``DataLoader``: the base's batched read, then one vectorised binning."""
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(indices)) if getitems is not None else [self.dataset[i] for i in indices]
        if not items:
            return []
        targets = torch.stack([self._scalar(self._target(item)) for item in items])
        labels = self.label_of(targets)
        return [self._attach(item, label) for item, label in zip(items, labels.unbind(0))]

    @property
    def labels(self) -> torch.Tensor:
        """``(len(dataset),)`` int64 class of every item (computed once, then cached)."""
        if self._labels is None:
            column = getattr(self.dataset, "column", None)
            if isinstance(self.target_key, str) and callable(column):
                targets = column(self.target_key)
            elif getattr(self.dataset, "targets", None) is not None:
                targets = self.dataset.targets
            else:
                targets = [self._scalar(self._target(self.dataset[i])) for i in range(len(self.dataset))]
                targets = torch.stack(targets) if targets else torch.zeros(0)
            if not isinstance(targets, torch.Tensor):
                targets = torch.from_numpy(np.asarray(targets))  # numpy keeps Python floats as float64
            if targets.dim() == 0 or targets.shape[0] != len(self) or targets.numel() != len(self):
                raise ValueError(f"{self.target_key}: expected one scalar per item ({len(self)},), "
                                 f"got {tuple(targets.shape)}")
            targets = targets.reshape(len(self))
            self._labels = self.label_of(targets)
        return self._labels
