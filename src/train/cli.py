"""The flags every example shares, with one meaning each, and the few helpers around them.

::

    p = argparse.ArgumentParser(description=__doc__)
    add_common_args(p, out="runs/fusion", lr=4e-4, precision="bf16")
    p.add_argument("--widths", ...)                      # the example's own flags
    args = p.parse_args()
    info = setup_distributed()
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    run = RunDir(args.out, run_config(args), resume=args.resume, overwrite=args.overwrite)

The shared flags: ``--out`` (the run folder), ``--epochs``, ``--batch-size`` (the *global* batch:
samples per micro-batch summed over the ranks; each rank takes ``batch / world``),
``--lr``, ``--precision {fp32,bf16,fp16}``, ``--seed``, ``--resume auto|PATH`` (continue the run
in ``--out``: from each stage's newest intact checkpoint, or from the checkpoint at PATH),
``--overwrite`` (move an earlier run in ``--out`` aside and start anew) and ``--smoke`` (tiny
sizes, seconds; for tests). Examples that can train sharded also take ``--fsdp`` (``fsdp=True``):
FSDP2 over the processes (:func:`~blockyard.train.shard_model`) and sharded checkpoints.
"""
from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

from .precision import PRECISIONS

__all__ = ["CONTROL_FLAGS", "add_common_args", "kill_point", "main_print", "per_rank_batch", "pyplot", "run_config"]

#: Flags that say how to run, not what is run: left out of :func:`run_config`, free to change on resume.
CONTROL_FLAGS = frozenset({"out", "resume", "overwrite", "kill_at_step"})


def add_common_args(parser: argparse.ArgumentParser, *, out: str, epochs: int | None = None,
                    batch_size: int | None = None, lr: float | None = None, precision: str = "fp32",
                    seed: int = 0, fsdp: bool = False) -> argparse.ArgumentParser:
    """Add the shared flags to ``parser``; the keywords are this example's defaults.

    A default of ``None`` lets the example pick one after parsing (by device or ``--smoke``);
    say so in its own help text by passing the example's defaults here where they are fixed.
    ``fsdp=True`` adds ``--fsdp``, for an example that implements it. It is part of
    :func:`run_config`: a resume keeps it (the world size may change: sharded checkpoints reshard).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    g = parser.add_argument_group("run (shared by every example)")
    g.add_argument("--out", default=out, help=f"run folder (default {out}); a used one is refused unless "
                   "--resume or --overwrite")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs" + _default(epochs))
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch: samples per micro-batch summed over all processes (an optimizer step "
                        "with gradient accumulation sees that times the micro-batches it accumulates)"
                        + _default(batch_size))
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate" + _default(lr))
    g.add_argument("--precision", default=precision, choices=list(PRECISIONS),
                   help=f"autocast precision; fp16 uses a GradScaler (default {precision})")
    g.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue the run in --out: 'auto' from its newest intact checkpoints, PATH from that "
                        "checkpoint; refused when the run's saved configuration differs")
    g.add_argument("--overwrite", action="store_true",
                   help="move an earlier run in --out aside into OUT/previous/ (never deleted) and start anew")
    g.add_argument("--smoke", action="store_true", help="tiny data and model: seconds, for tests")
    if fsdp:
        g.add_argument("--fsdp", action="store_true",
                       help="shard parameters, gradients and optimizer state over the processes (FSDP2) instead "
                            "of replicating them (DDP); every process writes its shards of each checkpoint")
    g.add_argument("--kill-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL mid-run
    return parser


def _default(value: Any) -> str:
    return "" if value is None else f" (default {value})"


def run_config(args: argparse.Namespace, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """What defines the run: every parsed flag but :data:`CONTROL_FLAGS` and ``ignore``.

    Tuples become lists, so the result equals what ``run.json`` gives back.
    """
    skip = CONTROL_FLAGS | set(ignore)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items()) if k not in skip}


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``batch_size // world_size``; a clear error when the global batch does not divide over the ranks."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {batch_size!r}")
    if batch_size % world_size:
        raise ValueError(f"--batch-size: the global batch {batch_size} does not divide over {world_size} "
                         f"processes; use a multiple of {world_size}")
    return batch_size // world_size


def main_print(is_main: bool) -> Callable[..., None]:
    """``print`` on the main process, a no-op elsewhere (for the example scripts' progress lines)."""
    return print if is_main else (lambda *args, **kwargs: None)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def kill_point(at_step: int | None, step: int) -> None:
    """SIGKILL this process when ``step == at_step``: a real crash mid-run, for resume tests."""
    if at_step is not None and step == at_step:
        os.kill(os.getpid(), signal.SIGKILL)
