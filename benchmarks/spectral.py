"""SpectralConv2d forward+backward: blockyard vs a straightforward einsum FNO layer (and neuraloperator).

The reference is the textbook two-corner layer (Li et al.'s ``weights1``/``weights2``, complex
parameters, one einsum per corner, written out here). neuraloperator's ``SpectralConv`` is timed
too when it is importable (keep it in a separate virtualenv: it must never become a dependency;
e.g. ``python -m venv --system-site-packages /tmp/nop && /tmp/nop/bin/pip install --no-deps
neuraloperator tensorly tensorly-torch opt-einsum zencfg`` and run this script with that python).
Variants are interleaved round-robin and medians reported (the machine is shared and noisy).

    python benchmarks/spectral.py [--batch 16] [--channels 32] [--size 64] [--modes 12] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from blockyard.blocks import SpectralConv2d


class EinsumSpectralConv2d(nn.Module):
    """The straightforward layer: complex weights for the (+ky, kx) and (-ky, kx) corners."""

    def __init__(self, cin: int, cout: int, m1: int, m2: int) -> None:
        super().__init__()
        scale = 1 / (cin * cout)
        self.m1, self.m2, self.cout = m1, m2, cout
        self.w1 = nn.Parameter(scale * torch.rand(cin, cout, m1, m2, dtype=torch.cfloat))
        self.w2 = nn.Parameter(scale * torch.rand(cin, cout, m1, m2, dtype=torch.cfloat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        xf = torch.fft.rfft2(x, norm="forward")
        out = torch.zeros(b, self.cout, h, w // 2 + 1, dtype=torch.cfloat, device=x.device)
        out[:, :, : self.m1, : self.m2] = torch.einsum("bixy,ioxy->boxy", xf[:, :, : self.m1, : self.m2], self.w1)
        out[:, :, -self.m1:, : self.m2] = torch.einsum("bixy,ioxy->boxy", xf[:, :, -self.m1:, : self.m2], self.w2)
        return torch.fft.irfft2(out, s=(h, w), norm="forward")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--modes", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    c, m = args.channels, args.modes
    layers = {"blockyard": SpectralConv2d(c, c, m), "einsum reference": EinsumSpectralConv2d(c, c, m, m)}
    try:
        from neuralop.layers.spectral_convolution import SpectralConv

        # neuraloperator counts total modes per dim (both signs): 2*m vertical, m horizontal kept.
        layers["neuraloperator"] = SpectralConv(c, c, n_modes=(2 * m, 2 * m - 1), bias=False)
    except ImportError:
        pass
    x = torch.randn(args.batch, c, args.size, args.size, requires_grad=True)
    times: dict[str, list[float]] = {k: [] for k in layers}
    cpu: dict[str, list[float]] = {k: [] for k in layers}
    for step in range(args.warmup + args.steps):
        for name, layer in layers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            layer(x).square().mean().backward()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    base = statistics.median(times["blockyard"])
    base_cpu = statistics.median(cpu["blockyard"])
    print(f"SpectralConv2d fwd+bwd, batch {args.batch}, {c}->{c} channels, {args.size}x{args.size}, modes {m} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    # Process CPU time (all threads) is reported beside wall time: on a shared machine it is the steadier one.
    print(f"{'implementation':<20} {'wall ms':>9} {'vs blockyard':>13} {'CPU ms':>9} {'vs blockyard':>13}")
    for name, t in times.items():
        med, med_cpu = statistics.median(t), statistics.median(cpu[name])
        print(f"{name:<20} {1e3 * med:>9.2f} {med / base:>12.2f}x {1e3 * med_cpu:>9.2f} {med_cpu / base_cpu:>12.2f}x")
    if "neuraloperator" not in layers:
        print("(neuraloperator not importable here: see the module docstring for a separate environment)")


if __name__ == "__main__":
    main()
