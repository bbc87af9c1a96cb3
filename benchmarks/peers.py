"""Every blockyard block that has a peer, timed side by side with that peer: forward + backward, float32.

Peers (timm, neuraloperator, PyTorch Geometric, MONAI, diffusers) never become blockyard
dependencies: they live in a separate virtualenv that sees the system torch. One command sets it up
(``--no-deps`` where a peer pins torch, so pip never replaces the installed torch with another
multi-GB build; the script stops if the venv holds a torch of its own)::

    python -m venv --system-site-packages /tmp/peers && /tmp/peers/bin/pip install diffusers torch_geometric \\
      && /tmp/peers/bin/pip install --no-deps timm torchvision==0.28.0 monai neuraloperator tensorly \\
         tensorly-torch opt-einsum zencfg

(torchvision is the release paired with torch 2.13; pick the one paired with your torch.) Then::

    /tmp/peers/bin/python benchmarks/peers.py               # every row, 15 interleaved rounds
    /tmp/peers/bin/python benchmarks/peers.py --only GRN,LayerNorm2d --rounds 30

A peer that cannot be imported is skipped with the reason printed; the others still run.

Protocol. Each row builds our block and the peer on the same inputs, copies the weights across
where the two compute the same function and asserts that outputs and gradients agree
(``torch.testing.assert_close``), so the timing compares equal work; where they do not (the
U-Net pair: different architectures at equal parameter count; the masked stage: leak-free
masking against the seed's input-only masking) the row says so. One timed sample is ``reps``
calls (chosen in the warm-up so a sample lasts about ``--sample-ms``); every round times one
sample of every row's ours and peer in turn, alternating which goes first, so load from other
processes on a shared machine falls on both alike. The table gives the medians over rounds and
their ratio (ours / peer: below 1 is faster), the median of the per-round ratios, and the ratio of
process CPU times (robust to other jobs when the run has one thread: ``--threads 1``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peer_blocks import BLOCK_CASES, Case, Skip
from _peer_systems import SYSTEM_CASES

CASES: dict[str, Callable[[], Case]] = {**BLOCK_CASES, **SYSTEM_CASES}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated row keys (default all): {', '.join(CASES)}")
    p.add_argument("--rounds", type=int, default=15, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--sample-ms", type=float, default=60.0, help="target length of one timed sample")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def calibrate(fn: Callable[[], object], target_s: float) -> int:
    """Calls per sample so that one sample lasts about ``target_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, round(target_s / dt))


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if sys.prefix != sys.base_prefix and os.path.abspath(torch.__file__).startswith(os.path.abspath(sys.prefix)):
        raise SystemExit(f"torch {torch.__version__} was installed into this virtualenv ({torch.__file__}), "
                         "not taken from the system: a peer pulled in its own torch; recreate the venv with "
                         "the --no-deps installs of the docstring")
    keys = [k for k in args.only.split(",") if k] or list(CASES)
    unknown = sorted(set(keys) - set(CASES))
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; known: {list(CASES)}")
    cases: list[Case] = []
    for key in keys:
        torch.manual_seed(args.seed)
        try:
            cases.append(CASES[key]())
        except Skip as why:
            print(f"skipped {key}: {why}")
    if not cases:
        raise SystemExit("no row could be built (see the skip reasons above)")

    reps = [(calibrate(c.ours, args.sample_ms / 1e3), calibrate(c.peer, args.sample_ms / 1e3)) for c in cases]
    ours: list[list[tuple[float, float]]] = [[] for _ in cases]
    peer: list[list[tuple[float, float]]] = [[] for _ in cases]
    for rnd in range(args.warmup + args.rounds):
        for i, c in enumerate(cases):
            r_ours, r_peer = reps[i]
            if rnd % 2 == 0:
                t_ours, t_peer = timed(c.ours, r_ours), timed(c.peer, r_peer)
            else:
                t_peer, t_ours = timed(c.peer, r_peer), timed(c.ours, r_ours)
            if rnd >= args.warmup:
                ours[i].append(t_ours)
                peer[i].append(t_peer)

    load = os.getloadavg()
    print(f"torch {torch.__version__} (the system's), {torch.get_num_threads()} threads, float32, forward + backward "
          f"unless the row says otherwise; {args.rounds} interleaved rounds (medians); load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    print("wall: medians of perf_counter; paired: median of the per-round wall ratios; CPU: the same ratio of "
          "process CPU time (all threads; steadier than wall when other jobs share the machine)")
    head = f"| {'block (shape)':<58} | {'peer':<48} | {'ours ms':>8} | {'peer ms':>8} | {'ours/peer':>9} " \
           f"| {'paired':>6} | {'CPU':>5} | numerics |"
    print(head)
    print("|" + "|".join("-" * len(col) for col in head.split("|")[1:-1]) + "|")
    for i, c in enumerate(cases):
        wall_o, cpu_o = zip(*ours[i])
        wall_p, cpu_p = zip(*peer[i])
        o, p = statistics.median(wall_o), statistics.median(wall_p)
        paired = statistics.median(a / b for a, b in zip(wall_o, wall_p))
        cpu = statistics.median(cpu_o) / statistics.median(cpu_p)
        print(f"| {c.name:<58} | {c.peer_name:<48} | {1e3 * o:>8.3f} | {1e3 * p:>8.3f} | {o / p:>9.2f} "
              f"| {paired:>6.2f} | {cpu:>5.2f} | {c.numerics} |")


if __name__ == "__main__":
    main()
