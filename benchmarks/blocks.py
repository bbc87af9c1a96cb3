"""Training-step speed of the blockyard U-Net under float32, bfloat16 autocast, channels_last and
torch.compile, next to this machine's matmul throughput (the ceiling) measured in the same run.

    python benchmarks/blocks.py                 # UNet(9, 32, widths=(48, 96, 192, 192), cond_dim=192,
                                                #      attention=True, stem="projection"): FusionNet's
                                                #      levels, batch 8 at 128 x 128
    python benchmarks/blocks.py --quick         # batch 2 at 64 x 64, 3 steps, no compile
    python benchmarks/blocks.py --no-compile --profile  # and where the time of an fp32 and a bf16 step goes

"bf16 + cl, torch GroupNorm" is the bf16 + channels_last step with ``nn.GroupNorm``'s own forward
in place of blockyard's ``GroupNorm`` (whose channels-last half-precision backward runs PyTorch's
NCHW kernel), so the gain of that path is measured in the same run.

One step = zero grads, forward (under autocast where named), ``out.float().square().mean()``,
backward; no optimizer. Variants run round-robin (one step of each in turn) so that load from
other processes on a shared machine hits all of them alike. The table reports the median and the
best (min) time and GFLOP/s for both: on a busy machine the best step is the closer estimate of
the uncontended speed, and "% ceiling" compares the best step with the best matmul. The last two
columns are the median process CPU time per step and its ratio to fp32's (with one thread, the
measure least moved by other jobs), followed by the load average. FLOPs
are counted once on the float32 eager step with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matmuls, attention; elementwise ops count zero), so GFLOP/s is comparable across
variants. The ceiling is a square matmul of the same dtype.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from blockyard.blocks import UNet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="input height and width")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation happens here)")
    p.add_argument("--quick", action="store_true", help="batch 2, 64 x 64, 3 steps, eager variants only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile one fp32 and one bf16 + channels_last step and print where the time goes")
    args = p.parse_args()
    if args.quick:
        args.batch, args.size, args.steps, args.no_compile = 2, 64, 3, True
    return args


def build_model() -> UNet:
    return UNet(9, 32, widths=(48, 96, 192, 192), cond_dim=192, attention=True, stem="projection")


def make_step(model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor,
              bf16: bool) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, cond)
        out.float().square().mean().backward()
    return step


def make_matmul(dtype: torch.dtype, n: int = 2048) -> tuple[Callable[[], None], float]:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return (lambda: a @ b), 2.0 * n**3


# torch.profiler op names -> the part of the network they belong to
CATEGORIES = {"convolution": ("conv", "_slow_conv2d"), "group_norm": ("group_norm",),
              "SiLU": ("silu",), "attention": ("attention", "bmm", "mm", "addmm", "softmax"),
              "elementwise (add, mul, casts, zeroing)": ("add", "mul", "copy", "fill_", "zero_", "sum", "clone"),
              "pool / upsample": ("pool", "upsample")}


def profile_step(step: Callable[[], None]) -> dict[str, float]:
    """Self CPU seconds of one step by category (:data:`CATEGORIES`, the rest under "other")."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        cat = next((c for c, keys in CATEGORIES.items() if any(name.startswith(k) or k in name for k in keys)),
                   "other")
        out[cat] = out.get(cat, 0.0) + event.self_cpu_time_total / 1e6
    return out


def print_profile(steps: dict[str, Callable[[], None]]) -> None:
    """Where the step's time goes, fp32 beside bf16: the shares that do not shrink bound the speed-up."""
    shares = {name: profile_step(fn) for name, fn in steps.items()}
    names = list(steps)
    cats = [*CATEGORIES, "other"]
    print("\nprofile of one step (torch.profiler self CPU time; profiling adds overhead, compare shares)")
    print(f"| {'part':<40} | " + " | ".join(f"{n + ' s':>12} | {'share':>5}" for n in names)
          + f" | {names[0] + ' / ' + names[-1]:>16} |")
    totals = {n: sum(shares[n].values()) for n in names}
    for cat in [*cats, "total"]:
        vals = {n: (totals[n] if cat == "total" else shares[n].get(cat, 0.0)) for n in names}
        ratio = f"{vals[names[0]] / vals[names[-1]]:.2f}x" if vals[names[-1]] else ""
        print(f"| {cat:<40} | " + " | ".join(f"{vals[n]:>12.3f} | {100 * vals[n] / totals[n]:>4.0f}%" for n in names)
              + f" | {ratio:>16} |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = build_model()
    x = torch.randn(args.batch, 9, args.size, args.size)
    cond = torch.randn(args.batch, 192)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def clone(channels_last: bool, torch_group_norm: bool = False) -> torch.nn.Module:
        m = copy.deepcopy(base)
        if torch_group_norm:  # blockyard's GroupNorm adds no state: torch's forward on the same module
            for mod in m.modules():
                if isinstance(mod, torch.nn.GroupNorm):
                    mod.__class__ = torch.nn.GroupNorm
        return m.to(memory_format=torch.channels_last) if channels_last else m

    # name -> (step, flops per call, matmul dtype of its ceiling)
    variants: dict[str, tuple[Callable[[], None], float | None, torch.dtype]] = {
        "fp32": (make_step(clone(False), x, cond, False), None, torch.float32),
        "fp32 + channels_last": (make_step(clone(True), x_cl, cond, False), None, torch.float32),
        "bf16 autocast": (make_step(clone(False), x, cond, True), None, torch.bfloat16),
        "bf16 + channels_last": (make_step(clone(True), x_cl, cond, True), None, torch.bfloat16),
        "bf16 + cl, torch GroupNorm": (make_step(clone(True, True), x_cl, cond, True), None, torch.bfloat16),
    }
    if not args.no_compile:
        variants["compiled fp32 + channels_last"] = (
            make_step(torch.compile(clone(True), fullgraph=True), x_cl, cond, False), None, torch.float32)
        variants["compiled bf16 + channels_last"] = (
            make_step(torch.compile(clone(True), fullgraph=True), x_cl, cond, True), None, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        fn, flops = make_matmul(dtype, 1024 if args.quick else 2048)
        variants[f"matmul {str(dtype).removeprefix('torch.')} (ceiling)"] = (fn, flops, dtype)

    with FlopCounterMode(display=False) as counter:
        make_step(clone(False), x, cond, False)()
    step_flops = counter.get_total_flops()

    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(args.warmup + args.steps):
        for name, (fn, _, _) in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rnd == 0:
                first[name] = dt
            if rnd >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_med = {name: statistics.median(ts) for name, ts in cpu.items()}
    best = {name: min(ts) for name, ts in times.items()}
    ceiling = {dt: (variants[n][1] or step_flops) / best[n] / 1e9
               for n, (_, _, dt) in variants.items() if n.startswith("matmul")}
    print("UNet(9, 32, widths=(48, 96, 192, 192), cond_dim=192, attention=True, stem='projection'): "
          f"batch {args.batch}, "
          f"{args.size}x{args.size}, {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params, "
          f"{step_flops / 1e9:.1f} GFLOP per forward+backward; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.steps} round-robin rounds")
    head = f"| {'variant':32s} | {'median ms':>9s} | {'best ms':>8s} | {'1st call ms':>11s} | " \
           f"{'GFLOP/s med':>11s} | {'GFLOP/s best':>12s} | {'% ceiling':>9s} | {'vs fp32 (best)':>14s} | " \
           f"{'CPU ms med':>10s} | {'vs fp32 (CPU)':>13s} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, (_, flops, dtype) in variants.items():
        gf_med, gf_best = ((flops or step_flops) / t / 1e9 for t in (med[name], best[name]))
        speed = "" if flops else f"{best['fp32'] / best[name]:.2f}x"
        cpu_speed = "" if flops else f"{cpu_med['fp32'] / cpu_med[name]:.2f}x"
        pct = f"{100 * gf_best / ceiling[dtype]:.0f}%"
        print(f"| {name:32s} | {1e3 * med[name]:9.1f} | {1e3 * best[name]:8.1f} | {1e3 * first[name]:11.0f} | "
              f"{gf_med:11.1f} | {gf_best:12.1f} | {pct:>9s} | {speed:>14s} | {1e3 * cpu_med[name]:10.1f} | "
              f"{cpu_speed:>13s} |")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.profile:
        print_profile({"fp32": variants["fp32"][0], "bf16 + channels_last": variants["bf16 + channels_last"][0]})


if __name__ == "__main__":
    main()
