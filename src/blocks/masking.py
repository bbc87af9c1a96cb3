"""Masking ops for masked autoencoders: random masks, mask pooling, padded gather and scatter.

Conventions: in every ``mask`` argument **True = masked** (hidden, to be predicted). ``valid``
in :func:`random_mask` is the opposite kind of flag (True = alive, may be masked).

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(https://arxiv.org/abs/2111.06377); Woo et al., "ConvNeXt V2", CVPR 2023
(https://arxiv.org/abs/2301.00808).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Gathered", "downsample_mask", "gather_masked", "random_mask", "scatter_masked"]


def _float_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps round(ratio * n) equal to Python's; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_spatial_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Validate a bool spatial ``mask`` of ``(B, H, W)`` or ``(B, 1, H, W)``; return it as ``(B, 1, H, W)``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = masked), got {mask.dtype}")
    if mask.shape not in ((batch, height, width), (batch, 1, height, width)):
        raise ValueError(f"mask: expected ({batch}, {height}, {width}) or "
                         f"({batch}, 1, {height}, {width}), got {tuple(mask.shape)}")
    return mask.reshape(batch, 1, height, width)


def random_mask(batch: int, n: int, ratio: float, valid: torch.Tensor | None = None,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    r"""Uniformly random mask with exactly ``round(ratio * n_valid)`` masked positions per row.

    Each row draws i.i.d. uniform keys, pushes invalid positions behind every valid one, and
    masks the ``k_b`` smallest keys (one ``argsort`` for the whole batch, no loop, no host
    sync), so every ``k_b``-subset of the valid positions is equally likely.

    .. math::
        k_b = \operatorname{round}(\text{ratio} \cdot \textstyle\sum_n \text{valid}_{b,n})

    ``round`` is round-half-to-even, like Python's (computed in float64). FCMAE's
    ``gen_random_mask`` instead keeps ``int(n * (1 - ratio))`` positions, which can differ by one.

    Args:
        batch: number of rows ``B``.
        n: positions per row.
        ratio: fraction of the valid positions to mask, in ``[0, 1]``.
        valid: optional bool ``(B, n)``, **True = valid** (alive); invalid positions are never
            masked. Default: every position is valid.
        generator: source of randomness (must live on ``device``).
        device: where to build the mask; defaults to ``valid.device`` when ``valid`` is given.

    Shapes:
        - valid: ``(B, n)`` bool
        - output: ``(B, n)`` bool, **True = masked**
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: expected a fraction in [0, 1], got {ratio}")
    if batch < 0 or n < 0:
        raise ValueError(f"batch, n: expected >= 0, got batch={batch}, n={n}")
    if valid is not None:
        if valid.dtype != torch.bool:
            raise TypeError(f"valid: expected a bool tensor (True = valid), got {valid.dtype}")
        if valid.shape != (batch, n):
            raise ValueError(f"valid: expected ({batch}, {n}), got {tuple(valid.shape)}")
        device = valid.device
    device = torch.device("cpu") if device is None else torch.device(device)
    fdtype = _float_dtype(device)
    keys = torch.rand(batch, n, generator=generator, device=device, dtype=fdtype)
    if valid is None:
        k = torch.full((batch, 1), round(ratio * n), device=device)
    else:
        keys = keys.masked_fill(~valid, 2.0)  # sorts behind every valid key, which are < 1
        k = torch.round(valid.sum(1, keepdim=True).to(fdtype) * ratio).long()
    order = keys.argsort(dim=1)
    ranks = torch.arange(n, device=device).expand(batch, n)
    return torch.zeros(batch, n, dtype=torch.bool, device=device).scatter(1, order, ranks < k)


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pool a mask by ``factor``: a coarse cell is masked only if **all** its children are.

    This is ``1 - maxpool(1 - mask)``, the rule that keeps a downsampled FCMAE mask exact: any
    visible child makes the coarse cell visible, so no visible information is hidden.

    Args:
        mask: bool, **True = masked**.
        factor: pooling factor; ``H`` and ``W`` must be divisible by it.

    Shapes:
        - mask: ``(B, H, W)`` or ``(B, 1, H, W)``
        - output: ``(B, H // factor, W // factor)`` or ``(B, 1, H // factor, W // factor)``
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = masked), got {mask.dtype}")
    if not (mask.dim() == 3 or (mask.dim() == 4 and mask.shape[1] == 1)):
        raise ValueError(f"mask: expected (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if factor < 1:
        raise ValueError(f"factor: expected >= 1, got {factor}")
    height, width = mask.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"mask: expected H and W divisible by factor={factor}, got {tuple(mask.shape)}")
    lead = mask.shape[:-2]
    cells = mask.reshape(*lead, height // factor, factor, width // factor, factor)
    return cells.all(dim=-1).all(dim=-2)


class Gathered(NamedTuple):
    """Masked entries packed into a padded batch by :func:`gather_masked`.

    - values: ``(B, M, C)``, zeros at padding
    - index: ``(B, M)`` positions, or ``(B, M, 2)`` as ``(y, x)`` for maps; 0 at padding
    - valid: ``(B, M)`` bool, **True = a real entry**, False = padding
    """

    values: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor


def _slots(mask: torch.Tensor, max_count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions ``(B, M)`` of the masked entries in ascending order, and their validity."""
    batch, n = mask.shape
    counts = mask.sum(dim=1)
    if max_count is None:
        m = int(counts.max()) if batch * n > 0 else 0  # the one host sync: M sets a shape
    else:
        if max_count < 0:
            raise ValueError(f"max_count: expected >= 0, got {max_count}")
        m = max_count
        # asynchronous on accelerators: refuses to drop entries without waiting for the device
        torch._assert_async((counts <= m).all(), "gather_masked: a row has more than max_count masked entries")
    # slot of each masked entry = number of masked entries before it; the rest go to a dump slot m
    slot = torch.where(mask, mask.cumsum(dim=1) - 1, m).clamp_max(m)
    positions = torch.arange(n, device=mask.device).expand(batch, n)
    index = torch.zeros(batch, m + 1, dtype=torch.long, device=mask.device).scatter(1, slot, positions)
    valid = torch.arange(m, device=mask.device) < counts.unsqueeze(1)
    return torch.where(valid, index[:, :m], 0), valid


def gather_masked(values: torch.Tensor, mask: torch.Tensor, max_count: int | None = None) -> Gathered:
    r"""Pack the masked entries of each sample into a zero-padded ``(B, M, C)`` batch.

    Entries come in ascending position order (row-major ``(y, x)`` for maps). ``M`` is the
    largest masked count in the batch; shorter rows are padded with ``valid = False``, value 0
    and index 0. Fully vectorised: one cumulative sum and one scatter build the index table, no
    ``nonzero``, no loop over the batch.

    Host sync: without ``max_count``, reading ``M`` off the device is the single sync (and a
    data-dependent shape that ``torch.compile`` cannot trace without a graph break). A caller
    that knows a bound (e.g. ``round(ratio * n)`` from :func:`random_mask`) passes ``max_count``:
    no sync, static shapes, ``M = max_count``; a row with more masked entries raises (via an
    asynchronous device assert) instead of being truncated.

    Args:
        values: tokens ``(B, N, C)`` or a map ``(B, C, H, W)``.
        mask: bool, **True = masked** (gathered).
        max_count: optional fixed ``M`` (>= every row's masked count).

    Shapes:
        - values: ``(B, N, C)`` with mask ``(B, N)``, or ``(B, C, H, W)`` with mask ``(B, H, W)``
          or ``(B, 1, H, W)``
        - output: :class:`Gathered` ``(values (B, M, C), index (B, M) or (B, M, 2), valid (B, M))``
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = masked), got {mask.dtype}")
    if values.dim() == 3:
        batch, n, channels = values.shape
        if mask.shape != (batch, n):
            raise ValueError(f"mask: expected ({batch}, {n}), got {tuple(mask.shape)}")
        index, valid = _slots(mask, max_count)
        out = values.gather(1, index.unsqueeze(-1).expand(-1, -1, channels))
        return Gathered(out.masked_fill(~valid.unsqueeze(-1), 0), index, valid)
    if values.dim() == 4:
        batch, channels, height, width = values.shape
        if mask.shape not in ((batch, height, width), (batch, 1, height, width)):
            raise ValueError(f"mask: expected ({batch}, {height}, {width}) or ({batch}, 1, {height}, {width}), "
                             f"got {tuple(mask.shape)}")
        flat, valid = _slots(mask.reshape(batch, height * width), max_count)
        out = values.flatten(2).gather(2, flat.unsqueeze(1).expand(-1, channels, -1)).transpose(1, 2)
        index = torch.stack((flat // width, flat % width), dim=-1)
        return Gathered(out.masked_fill(~valid.unsqueeze(-1), 0), index, valid)
    raise ValueError(f"values: expected (B, N, C) or (B, C, H, W), got {tuple(values.shape)}")


def scatter_masked(values: torch.Tensor, gathered_values: torch.Tensor, gathered: Gathered) -> torch.Tensor:
    """Write packed entries back at their positions: the inverse of :func:`gather_masked`.

    Out of place (``values`` is not modified) and differentiable with respect to both
    ``values`` (zero gradient where overwritten) and ``gathered_values`` (zero at padding).
    Padding entries (``gathered.valid == False``) are not written. ``gathered_values`` is cast
    to ``values.dtype`` (e.g. a bf16 decoder output written into a float32 map).

    Args:
        values: the tensor to copy and write into, laid out as when it was gathered.
        gathered_values: new entries, e.g. a decoder's predictions for the masked positions.
        gathered: the :class:`Gathered` whose ``index`` and ``valid`` say where they go.

    Shapes:
        - values: ``(B, N, C)`` or ``(B, C, H, W)``
        - gathered_values: ``(B, M, C)``
        - output: same as ``values``
    """
    index, valid = gathered.index, gathered.valid
    if values.dim() not in (3, 4):
        raise ValueError(f"values: expected (B, N, C) or (B, C, H, W), got {tuple(values.shape)}")
    batch = values.shape[0]
    channels = values.shape[2] if values.dim() == 3 else values.shape[1]
    m = valid.shape[-1]
    if valid.dim() != 2 or valid.shape[0] != batch:
        raise ValueError(f"gathered.valid: expected ({batch}, M), got {tuple(valid.shape)}")
    if gathered_values.shape != (batch, m, channels):
        raise ValueError(f"gathered_values: expected ({batch}, {m}, {channels}), got {tuple(gathered_values.shape)}")
    expected_index = (batch, m) if values.dim() == 3 else (batch, m, 2)
    if index.shape != expected_index:
        raise ValueError(f"gathered.index: expected {expected_index}, got {tuple(index.shape)}")
    src = gathered_values.to(values.dtype)
    if values.dim() == 3:
        n = values.shape[1]
        # padding is routed to an extra dump row that is cut off afterwards
        slot = torch.where(valid, index, n).unsqueeze(-1).expand(-1, -1, channels)
        padded = torch.cat((values, values.new_zeros(batch, 1, channels)), dim=1)
        return padded.scatter(1, slot, src)[:, :n]
    _, _, height, width = values.shape
    n = height * width
    flat = torch.where(valid, index[..., 0] * width + index[..., 1], n).unsqueeze(1).expand(-1, channels, -1)
    padded = torch.cat((values.flatten(2), values.new_zeros(batch, channels, 1)), dim=2)
    return padded.scatter(2, flat, src.transpose(1, 2))[..., :n].reshape(values.shape)
