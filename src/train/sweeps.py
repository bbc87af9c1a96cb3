"""Seeding and multi-seed summaries: median and inter-quartile range over successful runs, plus failures.

Reporting follows Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021
(https://arxiv.org/abs/2108.13264): robust statistics, with failed runs counted, not hidden.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SweepSummary", "seed_everything", "sweep_summary"]


def seed_everything(seed: int, deterministic: bool = False, device: torch.device | str | None = None
                    ) -> torch.Generator:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).

    This sets process-global state on purpose (it is the one place that does); library code
    itself draws from explicit generators. With ``deterministic=True`` it also switches torch to
    deterministic algorithms (``torch.use_deterministic_algorithms(True)``, cuDNN deterministic,
    benchmark off) and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` if unset, which cuBLAS needs;
    ``deterministic=False`` leaves those settings as they are.

    Args:
        seed: an integer in ``[0, 2**32)`` (NumPy's range).
        deterministic: also request deterministic kernels.
        device: device of the returned generator (default CPU).

    Returns:
        A new ``torch.Generator`` seeded with ``seed``, for code that takes ``generator=``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- seeding the legacy global RNG is the point here
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(seed)
    return generator


class SweepSummary(NamedTuple):
    """Summary of one configuration over several runs (seeds).

    ``n`` is the number of runs *including* failures, ``failures`` how many failed; ``median``,
    ``q25`` and ``q75`` are over the ``n - failures`` successful runs (NaN when there are none).
    """

    n: int
    failures: int
    median: float
    q25: float
    q75: float


def sweep_summary(values: Sequence[float | None], failed: Sequence[bool] | None = None) -> SweepSummary:
    """Median and quartiles of the successful runs, with the failure count alongside.

    A run counts as failed if ``failed[i]`` is true, or if its value is ``None`` or not finite
    (a diverged run's NaN would otherwise poison the statistics). Quartiles are NumPy's default
    linear-interpolation percentiles, ``np.percentile(x, [25, 75])``. If every run failed (or
    there are none) the statistics are NaN.

    Args:
        values: one final metric per run (``None`` for a run that produced nothing).
        failed: one flag per run, ``True`` = failed; ``None`` = judge by the values alone.

    Returns:
        ``SweepSummary(n, failures, median, q25, q75)``.
    """
    values = list(values)
    if failed is None:
        flags = [False] * len(values)
    else:
        flags = [bool(f) for f in failed]
        if len(flags) != len(values):
            raise ValueError(f"failed: expected {len(values)} flags (one per value), got {len(flags)}")
    ok = []
    failures = 0
    for v, f in zip(values, flags):
        x = math.nan if v is None else float(v)
        if f or not math.isfinite(x):
            failures += 1
        else:
            ok.append(x)
    if not ok:
        return SweepSummary(len(values), failures, math.nan, math.nan, math.nan)
    arr = np.asarray(ok, dtype=np.float64)
    q25, q75 = np.percentile(arr, [25, 75])
    return SweepSummary(len(values), failures, float(np.median(arr)), float(q25), float(q75))
