"""Exact m-heights of real linear codes by vertex enumeration, and System A's 21 (n, k, m) groups.

Roth, Zhu, Yuan, Siegel, Jiang, "On the Height Profile of Analog Error-Correcting Codes",
https://arxiv.org/abs/2602.20366 (the height profile as a maximum over a finite set of codewords).
Cross-checked against the course's example value, a naive loop over codewords and the reduced LP
of each (a, b, Y) in tests/examples/test_mheight_data.py.

A code ``C`` of length ``n`` and dimension ``k`` has the systematic generator ``G = [I_k | P]``.
The m-height of a codeword is ``h_m(c) = |c|_(0) / |c|_(m)`` (magnitudes sorted in decreasing
order, so ``|c|_(m)`` is the (m+1)-th largest) and of the code ``h_m(C) = max_{c != 0} h_m(c)``.
For an MDS code (every k columns of ``G`` independent; true almost surely for a random real ``P``)
the reduced LP of each (a, b, Y) is pointed and its optimum sits at a vertex, so

    h_m(C) = max over k-subsets S of the columns and sigma in {+1, -1}^k, sigma_0 = +1,
             of h_m(c) with c = sigma^T G_S^{-1} G   (so c_S = sigma).

The candidate set does not depend on m: one enumeration gives h_1 ... h_{n-k} at once.
"""
from __future__ import annotations

import itertools
from math import comb
from typing import Any

import numpy as np
import torch

__all__ = ["GROUPS", "NK", "bytes_per_code", "generator_matrix", "group_index", "group_indices", "mheights"]

# The dataset's 21 groups, ordered by n, then k, then m (row-major over the seed's table):
# (9,4,2..5), (9,5,2..4), (9,6,2..3), (10,4,2..6), (10,5,2..5), (10,6,2..4).
GROUPS: tuple[tuple[int, int, int], ...] = tuple(
    (n, k, m) for n in (9, 10) for k in (4, 5, 6) for m in range(2, n - k + 1))
# The 6 (n, k) pairs in the same order (one generator job / one MoE expert each).
NK: tuple[tuple[int, int], ...] = tuple((n, k) for n in (9, 10) for k in (4, 5, 6))
_GROUP_OF = {g: i for i, g in enumerate(GROUPS)}
_MAX_N, _MAX_K, _MAX_M = 10, 6, 6
_BUDGET = 16 * 2**20  # bytes of intermediates per chunk when chunk=None (16 MiB measured ~2x faster than 64)


def group_index(n: int, k: int, m: int) -> int:
    """Position of ``(n, k, m)`` in :data:`GROUPS`; ``ValueError`` if it is not one of the 21."""
    key = (int(n), int(k), int(m))
    if key != (n, k, m) or key not in _GROUP_OF:
        raise ValueError(f"(n, k, m): expected one of the 21 GROUPS (n in 9..10, k in 4..6, m in 2..n-k), "
                         f"got {(n, k, m)}")
    return _GROUP_OF[key]


def group_indices(side: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`group_index`: ``side[..., :3] = (n, k, m)`` -> index into :data:`GROUPS`.

    Float sides (as stored in the dataset) are accepted when they hold integers. Triples that
    are not a group (or not integral) map to ``-1`` instead of raising, so the function never
    syncs with the host and compiles.

    Shapes:
        - side: ``(..., 3)`` (or more columns; the first three are used)
        - output: ``(...)`` int64
    """
    if not isinstance(side, torch.Tensor):
        raise TypeError(f"side: expected a tensor, got {type(side).__name__}")
    if side.dim() < 1 or side.shape[-1] < 3:
        raise ValueError(f"side: expected (..., 3) holding (n, k, m), got {tuple(side.shape)}")
    nkm = side[..., :3]
    ints = nkm.round() if nkm.is_floating_point() else nkm
    bounds = torch.tensor([_MAX_N, _MAX_K, _MAX_M], device=side.device)
    valid = ((ints == nkm) & (ints >= 0) & (ints <= bounds.to(ints.dtype))).all(-1)
    idx = ints.long().clamp(min=0).minimum(bounds)
    table = torch.full((_MAX_N + 1, _MAX_K + 1, _MAX_M + 1), -1, dtype=torch.long)
    for i, (n, k, m) in enumerate(GROUPS):
        table[n, k, m] = i
    table = table.to(side.device)
    found = table[idx[..., 0], idx[..., 1], idx[..., 2]]
    return torch.where(valid, found, torch.full_like(found, -1))


def _as_codes(P: Any) -> torch.Tensor:
    if isinstance(P, np.ndarray):
        P = torch.from_numpy(P)
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"P: expected a (B, k, n-k) tensor or numpy array, got {type(P).__name__}")
    if P.dtype == torch.bool or P.is_complex():
        raise TypeError(f"P: expected real numbers, got {P.dtype}")
    if P.dim() != 3 or P.shape[1] < 1 or P.shape[2] < 1:
        raise ValueError(f"P: expected (B, k, n-k) with k, n-k >= 1, got {tuple(P.shape)}")
    P = P.to(torch.float64)
    finite = torch.isfinite(P).flatten(1).all(1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ValueError(f"P: expected finite values, got NaN or inf in code {i}")
    return P


def generator_matrix(P: Any) -> torch.Tensor:
    """Systematic generator ``G = [I_k | P]`` of each code, float64.

    Shapes:
        - P: ``(B, k, n-k)``
        - output: ``(B, k, n)``
    """
    P = _as_codes(P)
    eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device).expand(P.shape[0], -1, -1)
    return torch.cat([eye, P], dim=2)


def bytes_per_code(n: int, k: int) -> int:
    """Approximate peak bytes of :func:`mheights`' float64 intermediates per code of length ``n``, dimension ``k``."""
    subsets, signs = _count(n, k)
    return 8 * subsets * (4 * signs * (n - k) + 2 * k * n + 3 * k * k)


def _count(n: int, k: int) -> tuple[int, int]:
    return comb(n, k), 2 ** (k - 1)


def mheights(P: Any, *, chunk: int | None = None, rcond: float = 1e-12, on_singular: str = "raise") -> torch.Tensor:
    r"""Exact m-heights ``h_1 ... h_{n-k}`` of the codes with generators ``G = [I_k | P]``.

    .. math::
        h_m(C) = \max_{|S| = k,\ \sigma \in \{\pm 1\}^k,\ \sigma_0 = 1}
                 \frac{|c|_{(0)}}{|c|_{(m)}}, \qquad c = \sigma^\top G_S^{-1} G

    For each code and k-subset ``S`` the candidates are the ``2^{k-1}`` sign combinations of the
    rows of ``G_S^{-1} G`` (the codewords with ``c_S = e_j``); on ``S`` their magnitudes are
    exactly 1, so only the ``n-k`` other coordinates are computed and sorted (a sorting network)
    and then merged with the ``k`` ones. Everything is batched over codes and subsets
    (``torch.linalg.inv_ex``, two matmuls, elementwise max/min); the only Python loop is over
    chunks of codes, which bounds memory: a code costs about
    ``8 * C(n, k) * (4 * 2^{k-1} * (n-k) + 2 k n + 3 k^2)`` bytes (:func:`bytes_per_code`),
    e.g. 0.28 MB for (9, 4), 1.0 MB for (10, 5) and 1.2 MB for (10, 6).

    Non-MDS codes: the vertex argument needs every ``G_S`` invertible (which is exactly the MDS
    property; otherwise some ``h_m`` is infinite or needs other vertices), so a code with a
    singular or ill-conditioned ``G_S`` (1-norm reciprocal condition number below ``rcond``,
    e.g. a zero entry in ``P``) is never given a number silently: ``on_singular="raise"``
    raises ``ValueError`` naming the code index, ``"nan"`` returns a NaN row for it (the
    dataset builder redraws such codes). With ``rcond=1e-12`` the returned heights keep about
    four significant digits in the worst accepted case; typical relative errors are ~1e-13 to 1e-12
    (random U[-100, 100] codes have condition numbers up to ~1e9, far from the cut).

    Args:
        P: ``(B, k, n-k)`` parity parts (tensor or numpy array, any real dtype; computed in
            float64 on ``P``'s device). All codes of one call share ``(k, n-k)``.
        chunk: codes per batched step (default: as many as fit in about 16 MiB).
        rcond: smallest accepted reciprocal condition number of any ``G_S``, in ``[0, 1)``.
        on_singular: ``"raise"`` or ``"nan"``, see above.

    Returns:
        ``(B, n-k)`` float64 tensor, column ``m - 1`` holding ``h_m`` (so ``1 <= h_1 <= h_2 ...``).

    Shapes:
        - P: ``(B, k, n-k)``
        - output: ``(B, n-k)``
    """
    P = _as_codes(P)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
    if not 0.0 <= rcond < 1.0:
        raise ValueError(f"rcond: expected in [0, 1), got {rcond}")
    if on_singular not in ("raise", "nan"):
        raise ValueError(f"on_singular: expected 'raise' or 'nan', got {on_singular!r}")
    B, k, r = P.shape
    n = k + r
    combos = list(itertools.combinations(range(n), k))
    subsets = torch.tensor(combos, dtype=torch.long, device=P.device)
    rest = torch.tensor([[j for j in range(n) if j not in c] for c in combos], dtype=torch.long, device=P.device)
    signs = torch.tensor([(1.0, *s) for s in itertools.product((1.0, -1.0), repeat=k - 1)],
                         dtype=torch.float64, device=P.device)
    step = int(chunk) if chunk is not None else max(1, _BUDGET // bytes_per_code(n, k))
    out = P.new_empty(B, r)
    for start in range(0, B, step):
        h, bad = _chunk_heights(P[start:start + step], subsets, rest, signs, rcond)
        if bool(bad.any()):
            if on_singular == "raise":
                i = int(bad.nonzero()[0])
                raise ValueError(f"P: code {start + i} is not MDS to working precision (a k x k submatrix of "
                                 f"[I | P] is singular or has reciprocal condition number < rcond={rcond}); "
                                 f"its m-heights are not given by vertex enumeration")
            h = torch.where(bad[:, None], torch.full_like(h, float("nan")), h)
        out[start:start + step] = h
    return out


def _sorted_desc(cols: list[torch.Tensor]) -> list[torch.Tensor]:
    # Odd-even transposition network on r <= n-k columns: elementwise max/min on contiguous
    # (b, S, 2^{k-1}) slabs is ~10x faster than torch.sort along a short last dimension.
    cols = list(cols)
    for rnd in range(len(cols)):
        for i in range(rnd % 2, len(cols) - 1, 2):
            cols[i], cols[i + 1] = torch.maximum(cols[i], cols[i + 1]), torch.minimum(cols[i], cols[i + 1])
    return cols


def _chunk_heights(P: torch.Tensor, subsets: torch.Tensor, rest: torch.Tensor, signs: torch.Tensor,
                   rcond: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, k, r = P.shape
    eye = torch.eye(k, dtype=P.dtype, device=P.device).expand(b, -1, -1)
    G = torch.cat([eye, P], dim=2)                                # (b, k, n)
    GS = G[:, :, subsets].permute(0, 2, 1, 3)                     # (b, S, k, k): G_S[i, j] = G[i, S_j]
    inv, info = torch.linalg.inv_ex(GS)
    # ||A||_1 = max column sum; NaN/inf from a singular LU fail the comparison and count as bad.
    cond = GS.abs().sum(-2).amax(-1) * inv.abs().sum(-2).amax(-1)
    bad = ((info != 0) | ~(cond * rcond <= 1.0)).any(1)
    # Off S: c_rest = sigma^T G_S^{-1} G_rest, laid out (r, b, S, 2^{k-1}) so each coordinate is
    # one contiguous slab. On S, |c_S| = |sigma| = 1 exactly, which is used below instead of
    # the rounded product.
    rest_cols = G[:, :, rest].permute(0, 2, 1, 3)                 # (b, S, k, r)
    M = (inv @ rest_cols).permute(3, 0, 1, 2)                     # (r, b, S, k)
    y = _sorted_desc(list((M @ signs.T).abs().unbind(0)))         # r x (b, S, T), decreasing
    # Merge y with k ones: the j-th largest of the n magnitudes is min(max(y_j, 1), y_{j-k}),
    # with y_j = 0 past the end and y_{j-k} = +inf before the start.
    # (At the maximising vertex |c|_(m) = 1, so the y_{j-k} branch never sets h_m; it keeps every
    # candidate's ratio exact, which the lower-bound property relies on.)
    one = torch.ones((), dtype=P.dtype, device=P.device)
    top = torch.maximum(y[0], one)
    h = []
    for m in range(1, r + 1):
        z = torch.maximum(y[m], one) if m < r else one
        if m - k >= 0:
            z = torch.minimum(z, y[m - k])
        h.append((top / z).amax(dim=(1, 2)))
    return torch.stack(h, dim=1), bad
