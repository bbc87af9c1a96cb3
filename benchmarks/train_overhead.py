"""Per-step overhead of the blockyard.train kit relative to a bare optimizer step.

Variants, all on the same model, data and AdamW settings:

- ``bare``: forward, backward, ``AdamW.step``, ``zero_grad`` (the floor).
- ``kit``: the same step assembled from the kit: ``GradientAccumulator`` (``sync_context`` +
  ``backward``), ``clip_gradients(algorithm="norm")``, ``EMA.update`` and a ``Dashboard`` writing
  to a non-TTY sink; monitors off.
- ``kit ema/K``: ``kit`` with ``EMA(every=K)`` (``--ema-every``): the average moves every K-th
  step with the decays of the skipped steps compounded, so its horizon is unchanged.
- ``stepper``: the kit's step as the examples take it, through ``blockyard.train.Stepper`` (the
  same accumulation, clipping, EMA and dashboard, plus its non-finite guard: one check of the loss
  and the gradients per step, agreed across ranks) and ``stepper ema/K`` likewise.
- ``kit+monitors``: ``kit`` plus ``GradNormMonitor.compute_tensor()`` every step and an
  ``ActivationMonitor`` hooked on every Linear/Conv layer.

The machine this runs on is usually shared and noisy, so the variants are interleaved
round-robin (each round runs a block of steps of every variant in turn) and the table reports
medians over rounds of the per-step time. A second table times each kit component alone, to
show where the overhead goes.

Run::

    python benchmarks/train_overhead.py                  # MLP, 3.4M params, batch 64 (worst case)
    python benchmarks/train_overhead.py --model cnn      # small CNN, 1.25M params, batch 16
    python benchmarks/train_overhead.py --ablate         # also kit without EMA / without clipping, and
                                                         # the floors: bare + a copy of the weights every
                                                         # step (what any every-step EMA must at least
                                                         # do), bare + gradient norm + copy
    python benchmarks/train_overhead.py --optimizer fused  # AdamW(fused=True): a 6x faster bare step

Why the MLP is the worst case: at batch 64 its step is memory-bound, and an EMA update is one
read-read-write pass over the weights (as costly as a copy) and the clip's norm one more read of
the gradients, against a step whose own passes (forward, backward, AdamW) are only a few more.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import torch
from torch import nn

from blockyard.train import (
    EMA,
    ActivationMonitor,
    Dashboard,
    GradientAccumulator,
    GradNormMonitor,
    Stepper,
    clip_gradients,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 for the MLP, 16 for the CNN")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (all variants)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per variant per round")
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is least noisy when shared)")
    p.add_argument("--clip", type=float, default=1.0, help="max grad norm for clip_gradients")
    p.add_argument("--ablate", action="store_true", help="also run the kit without EMA and without clipping")
    p.add_argument("--ema-every", type=int, default=4, help="K of the 'kit ema/K' variant")
    p.add_argument("--optimizer", choices=["default", "foreach", "fused"], default="default",
                   help="AdamW implementation: torch's default for the device (single-tensor loop on the CPU), "
                        "foreach=True or fused=True")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(kind: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if kind == "mlp":
        width = 1024
        model = nn.Sequential(
            nn.Linear(256, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, 10),
        )
        return model, (256,), 10
    c = 96
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(8, c), nn.GELU(),
        nn.Conv2d(c, c, 3, padding=1, stride=2), nn.GroupNorm(8, c), nn.GELU(),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c), nn.GELU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2), nn.GroupNorm(8, 2 * c), nn.GELU(),
        nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.GroupNorm(8, 4 * c), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
    )
    return model, (3, 32, 32), 10


class Runner:
    """One variant: its own model copy, optimizer and kit objects; ``run(n)`` takes n optimizer steps."""

    def __init__(self, name: str, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], accum: int,
                 kit: bool, monitors: bool, clip: float = 1.0, use_clip: bool = True, use_ema: bool = True,
                 ema_every: int = 1, optimizer: str = "default", stepper: bool = False,
                 floor: tuple[str, ...] = ()) -> None:
        self.name, self.model, self.data, self.accum = name, model, data, accum
        self.floor = floor
        if "copy" in floor:
            self.copies = [torch.empty_like(p) for p in model.parameters()]
        self.kit, self.monitors = kit, monitors
        self.clip, self.use_clip, self.use_ema = clip, use_clip, use_ema
        self.clipped: list[bool] = []
        impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optimizer]
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **impl)
        self.loss_fn = nn.CrossEntropyLoss()
        self.step = 0
        self.cursor = 0
        self.sink = io.StringIO()  # not a TTY: one line per interval, no carriage returns
        if kit:
            self.acc = GradientAccumulator(accum)
            self.ema = EMA(model, decay=0.999, every=ema_every)  # before the activation hooks, so the copy has none
            self.dash = Dashboard(total=10**9, every_s=1.0, stream=self.sink)
        self.stepper = Stepper(model, self.opt, accumulate=accum, clip_value=clip, ema=self.ema) if stepper else None
        if monitors:
            self.grad_mon = GradNormMonitor(model, depth=1)
            self.act_mon = ActivationMonitor(model, module_types=(nn.Linear, nn.Conv2d))
            self.grad_norms: torch.Tensor | None = None

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[self.cursor % len(self.data)]
        self.cursor += 1
        return x, y

    def one_step(self) -> None:
        if not self.kit:
            for _ in range(self.accum):
                x, y = self._batch()
                loss = self.loss_fn(self.model(x), y)
                (loss / self.accum if self.accum > 1 else loss).backward()
            if "norm" in self.floor:  # the read of every gradient that any norm clip needs
                torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.model.parameters()])))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            if "copy" in self.floor:  # the pass over the weights that any every-step average needs
                with torch.no_grad():
                    torch._foreach_copy_(self.copies, list(self.model.parameters()))
            return
        if self.stepper is not None:
            for i in range(self.accum):
                x, y = self._batch()
                with self.stepper.micro_batch(i) as mb:
                    loss = self.loss_fn(self.model(x), y)
                    self.stepper.backward(loss)
            assert mb.step and self.stepper.step()
            self.dash.update(self.stepper.steps, loss=loss.detach(), grad_norm=self.stepper.grad_norm)
            return
        group_loss = 0.0
        for i in range(self.accum):
            x, y = self._batch()
            with self.acc.sync_context(self.model, i) as mb:
                loss = self.loss_fn(self.model(x), y)
                group_loss = group_loss + self.acc.backward(loss)
        assert mb.step
        grad_norm = clip_gradients(self.model, "norm", self.clip) if self.use_clip else None
        if self.monitors:
            self.grad_norms = self.grad_mon.compute_tensor()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.use_ema:
            self.ema.update(self.model, self.step)
        self.dash.update(self.step, loss=group_loss, grad_norm=grad_norm)
        if grad_norm is not None and self.step % 10 == 0:  # sampled: a CPU comparison, no sync
            self.clipped.append(bool(grad_norm > self.clip))

    def run(self, n: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per optimizer step over n steps."""
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.one_step()
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def time_components(runner: Runner, reps: int) -> dict[str, float]:
    """Median milliseconds per call of each kit component, on real gradients."""
    model, out = runner.model, {}
    x, y = runner.data[0]
    runner.opt.zero_grad(set_to_none=True)
    runner.loss_fn(model(x), y).backward()

    def med(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return 1e3 * statistics.median(times)

    def acc_ctx():
        with runner.acc.sync_context(model, 0):
            pass

    out["GradientAccumulator.sync_context"] = med(acc_ctx)
    out["clip_gradients(norm), not clipping"] = med(lambda: clip_gradients(model, "norm", 1e9))
    out["clip_gradients(norm), clipping"] = med(lambda: clip_gradients(model, "norm", 1e-9))
    out["EMA.update"] = med(lambda: runner.ema.update(model, 10_000))
    out["Dashboard.update"] = med(lambda: runner.dash.update(5, loss=0.1))
    out["AdamW.step (for scale)"] = med(runner.opt.step)
    params = [p.detach() for p in model.parameters()]
    copies = [torch.empty_like(p) for p in params]
    out["copy of the weights (the floor of EMA)"] = med(lambda: torch._foreach_copy_(copies, params))
    if runner.monitors:
        out["GradNormMonitor.compute_tensor"] = med(runner.grad_mon.compute_tensor)
    runner.opt.zero_grad(set_to_none=True)
    return out


def main() -> None:
    args = parse_args()
    if args.batch_size is None:
        args.batch_size = 64 if args.model == "mlp" else 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, in_shape, classes = build_model(args.model)
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(args.seed)
    data = [(torch.randn(args.batch_size, *in_shape, generator=g),
             torch.randint(0, classes, (args.batch_size,), generator=g)) for _ in range(8)]

    def clone() -> nn.Module:
        m, _, _ = build_model(args.model)
        m.load_state_dict(base.state_dict())
        return m

    opt = args.optimizer
    runners = [
        Runner("bare", clone(), data, args.accum, kit=False, monitors=False, optimizer=opt),
        Runner("kit", clone(), data, args.accum, kit=True, monitors=False, clip=args.clip, optimizer=opt),
        Runner(f"kit ema/{args.ema_every}", clone(), data, args.accum, kit=True, monitors=False, clip=args.clip,
               ema_every=args.ema_every, optimizer=opt),
        Runner("stepper", clone(), data, args.accum, kit=True, monitors=False, clip=args.clip, optimizer=opt,
               stepper=True),
        Runner(f"stepper ema/{args.ema_every}", clone(), data, args.accum, kit=True, monitors=False, clip=args.clip,
               ema_every=args.ema_every, optimizer=opt, stepper=True),
        Runner("kit+monitors", clone(), data, args.accum, kit=True, monitors=True, clip=args.clip, optimizer=opt),
    ]
    if args.ablate:
        runners += [
            Runner("kit-no-ema", clone(), data, args.accum, kit=True, monitors=False, clip=args.clip,
                   use_ema=False, optimizer=opt),
            Runner("kit-no-clip", clone(), data, args.accum, kit=True, monitors=False, use_clip=False,
                   optimizer=opt),
            Runner("bare+copy", clone(), data, args.accum, kit=False, monitors=False, optimizer=opt,
                   floor=("copy",)),
            Runner("bare+norm+copy", clone(), data, args.accum, kit=False, monitors=False, optimizer=opt,
                   floor=("norm", "copy")),
        ]
    wall: dict[str, list[float]] = {r.name: [] for r in runners}
    cpu: dict[str, list[float]] = {r.name: [] for r in runners}
    for rnd in range(args.warmup_rounds + args.rounds):
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]  # rotate who goes first
        for r in order:
            w, c = r.run(args.steps)
            if rnd >= args.warmup_rounds:
                wall[r.name].append(w)
                cpu[r.name].append(c)

    print(f"model {args.model}: {n_params / 1e6:.2f}M params, batch {args.batch_size} x accum {args.accum}, "
          f"threads {args.threads}, AdamW {args.optimizer}, {args.rounds} rounds x {args.steps} steps; "
          "medians over rounds")
    print("CPU = this process's CPU time (robust to other jobs on a shared machine); wall = perf_counter;")
    print("paired = median over rounds of (variant / bare - 1) within the same round")
    header = (f"{'variant':<15}{'CPU ms':>9}{'q25':>8}{'q75':>8}{'CPU ovh':>9}{'paired':>8}"
              f"{'wall ms':>10}{'wall ovh':>10}{'paired':>8}")
    print(header)
    print("-" * len(header))
    for name in wall:
        cq = statistics.quantiles(cpu[name], n=4)
        c_med, w_med = statistics.median(cpu[name]), statistics.median(wall[name])
        c_ovh = 100 * (c_med / statistics.median(cpu["bare"]) - 1)
        w_ovh = 100 * (w_med / statistics.median(wall["bare"]) - 1)
        c_pair = 100 * statistics.median([t / b - 1 for t, b in zip(cpu[name], cpu["bare"])])
        w_pair = 100 * statistics.median([t / b - 1 for t, b in zip(wall[name], wall["bare"])])
        print(f"{name:<15}{1e3 * c_med:>9.2f}{1e3 * cq[0]:>8.2f}{1e3 * cq[2]:>8.2f}{c_ovh:>8.1f}%{c_pair:>7.1f}%"
              f"{1e3 * w_med:>10.2f}{w_ovh:>9.1f}%{w_pair:>7.1f}%")

    sampled = runners[1].clipped
    if sampled:
        print(f"kit: gradient norm above --clip {args.clip} on {sum(sampled)}/{len(sampled)} sampled steps")
    print("\ncomponent costs (median CPU ms per call, called alone: caches warmer than in the loop)")
    for name, ms in time_components(next(r for r in runners if r.monitors), reps=30).items():
        print(f"  {name:<36}{ms:>8.3f}")
    print("load average at the end:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    for r in runners:
        if r.monitors:
            r.act_mon.remove()


if __name__ == "__main__":
    main()
