"""Memory per rank and step time of DDP vs FSDP2 (shard_model) for FusionNet's seed configuration.

FusionNet with the seed's widths 48,96,192,192 (4 poolings, GRU width 192) on 128x128 inputs,
AdamW, one optimizer step per batch, trained by ``--nproc`` processes two ways, each in its own
launch (so each gets its own peak):

- ``DDP``: ``wrap_ddp``; every rank holds the whole model, its gradients and AdamW's two moments.
- ``FSDP2``: ``shard_model(modules=(EncoderLevel, DecoderLevel))``; each rank holds 1/world of
  them, and one level's full parameters at a time during forward and backward.

Reported per rank: the bytes of the parameters, gradients and optimizer state it holds (counted
from the tensors: local shards under FSDP2), the peak memory above what the process held before
the model was built (``ru_maxrss`` on the CPU: it includes activations and the allocator's
caches; ``torch.cuda.max_memory_allocated`` on a GPU), and the median step time. The inputs are
random and the loss is the outputs' mean square: this measures the model, not the task. On a
shared CPU the step times are noisy; the memory columns are not.

    python benchmarks/fsdp_memory.py                     # 2 gloo processes on the CPU
    python benchmarks/fsdp_memory.py --nproc 4           # on a 4-GPU node: NCCL, CUDA memory
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from fusion.model import FusionNet  # noqa: E402

from blockyard.blocks import DecoderLevel, EncoderLevel  # noqa: E402
from blockyard.train import setup_distributed, shard_model, teardown_distributed, wrap_ddp  # noqa: E402

MODES = {"ddp": "DDP", "fsdp": "FSDP2"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (one per GPU on a GPU node)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per rank per step")
    p.add_argument("--size", type=int, default=128, help="grid side (the seed's canvas: 128)")
    p.add_argument("--widths", default="48,96,192,192", help="FusionNet widths (the seed's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # MODE:OUTFILE, set by the launcher
    return p.parse_args(argv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def worker(args, mode: str, out: Path) -> None:
    info = setup_distributed()
    torch.set_num_threads(1)
    cuda = info.device.type == "cuda"
    start = _rss_bytes()
    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    net = FusionNet(widths=widths, levels=len(widths), rnn_hidden=192).to(info.device)
    model = shard_model(net, modules=(EncoderLevel, DecoderLevel)) if mode == "fsdp" else wrap_ddp(net, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(info.rank)
    b, s = args.batch_size, args.size
    x = torch.randn(b, 9, s, s, generator=g).to(info.device)
    history = torch.cat([torch.randint(0, 12, (b, 32, 1), generator=g), torch.randint(0, s, (b, 32, 2), generator=g),
                         torch.randint(1, 50, (b, 32, 2), generator=g)], dim=-1).float().to(info.device)
    length = torch.full((b,), 32, device=info.device)
    crossings = torch.full((b,), 50.0, device=info.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        out_ = model(x, history, length, crossings)
        (out_.position.square().mean() + out_.action.square().mean()).backward()
        grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    result = {"params": _bytes(model.parameters()), "grads": grads,
              "optimizer": _bytes(t for st in opt.state.values() for t in st.values()),
              "full_params": sum(p.numel() * p.element_size() for p in model.parameters()),
              "peak": peak, "peak_kind": "CUDA max allocated" if cuda else "peak RSS above start",
              "step_s": statistics.median(times), "device": str(info.device), "world": info.world_size}
    (out / f"{mode}-rank{info.rank}.json").write_text(json.dumps(result))
    teardown_distributed()


def launch(args, mode: str, out: Path) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(args.nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{mode}:{out}"]
        procs.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() for p in procs):
        raise SystemExit(f"{MODES[mode]} launch failed")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(args.nproc)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        mode, out = args.worker.split(":", 1)
        worker(args, mode, Path(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: launch(args, mode, Path(tmp)) for mode in MODES}
    r0 = results["ddp"][0]
    print(f"FusionNet widths {args.widths}, {args.size}x{args.size}, batch {args.batch_size} per rank, "
          f"{args.nproc} processes on {r0['device'].split(':')[0]}, fp32, AdamW; "
          f"parameters {r0['full_params'] / 4:,.0f} ({r0['full_params'] / 2**20:.1f} MiB)")
    mib = 2.0 ** 20
    rows = [("parameters (MiB)", "params", mib), ("gradients (MiB)", "grads", mib),
            ("AdamW state (MiB)", "optimizer", mib), ("params+grads+AdamW (MiB)", None, mib),
            (f"{r0['peak_kind']} (MiB)", "peak", mib), ("step time (s, median)", "step_s", 1.0)]
    print(f"{'per rank':<34}{'DDP':>22}{'FSDP2':>22}{'FSDP2 / DDP':>14}")
    for label, key, unit in rows:
        def value(res, key=key, unit=unit):
            return (res["params"] + res["grads"] + res["optimizer"] if key is None else res[key]) / unit

        cells = []
        for mode in MODES:
            cells.append(" / ".join(f"{value(r):.2f}" for r in results[mode]))
        ratio = max(value(r) for r in results["fsdp"]) / max(value(r) for r in results["ddp"])
        print(f"{label:<34}{cells[0]:>22}{cells[1]:>22}{ratio:>14.2f}")
    print("(one value per rank, rank 0 first; the ratio compares the largest rank of each)")


if __name__ == "__main__":
    main()
