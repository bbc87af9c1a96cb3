"""What every design-decomposition stage script shares: its data flags and the dataset on first use.

Each stage (``examples/design_*.py``) takes ``--data DIR``; by default the dataset lives beside
the stage's run folder, in ``OUT/../data`` (``data-smoke`` under ``--smoke``, ``data-<size>px``
at another size), so the stages run into ``runs/design/<stage>`` share one ``runs/design/data``.
It is built on first use by the main process (``build_data.build``) while the others wait, and
reused afterwards (a finished build with other settings is refused by ``build``).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import NamedTuple

from blockyard.train import barrier, main_print

from .build_data import build
from .dataset import DesignData, open_split

__all__ = ["Splits", "add_data_args", "data_dir", "open_data"]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--designs``, ``--size``, ``--data-seed``, ``--workers`` (defaults by the stage after parsing)."""
    g = parser.add_argument_group("data (built on first use, shared by the stages)")
    g.add_argument("--data", default=None, help="dataset directory (default OUT/../data; built if missing)")
    g.add_argument("--designs", type=int, default=None, help="designs drawn for the dataset (default 20000)")
    g.add_argument("--size", type=int, default=None, help="rendering size in pixels (default 64; the seed's 256)")
    g.add_argument("--data-seed", type=int, default=0, help="generator seed of the dataset (default 0)")
    g.add_argument("--workers", type=int, default=_cpus(), help="processes building the dataset (default: the CPUs "
                   f"this process may use, {_cpus()})")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def data_dir(data: str | None, out: str, smoke: bool, size: int) -> Path:
    """``data`` if given, else ``OUT/../data`` (``data-smoke`` under ``--smoke``, ``data-<size>px`` unless 64)."""
    if data is not None:
        return Path(data)
    name = "data" + ("-smoke" if smoke else "") + ("" if size == 64 else f"-{size}px")
    return Path(out).resolve().parent / name


class Splits(NamedTuple):
    """The three splits of a built dataset and its directory."""

    train: DesignData
    val: DesignData
    test: DesignData
    path: Path


def open_data(path: Path, designs: int, size: int, seed: int, workers: int, is_main: bool) -> Splits:
    """Build the dataset at ``path`` if needed (main process; the others wait), then open every split.

    Checksums are verified on the main process only (the files are the same for every rank).
    """
    say = main_print(is_main)
    if is_main:
        tic = time.perf_counter()
        summary = build(path, designs=designs, size=size, seed=seed, workers=workers)
        say(f"dataset: {path} ({sum(summary['samples'].values())} designs at {size} px) ready in "
            f"{time.perf_counter() - tic:.1f} s")
    barrier()
    train, val, test = (open_split(path, split, verify=is_main) for split in ("train", "val", "test"))
    return Splits(train, val, test, path)
