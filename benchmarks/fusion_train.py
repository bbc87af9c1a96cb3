"""FusionNet training throughput: float32 vs bf16 autocast (+ channels_last), bucketed vs padded batches.

One *step* is what fusion_ddp.py does per batch: encode the 9 channels and the legal-anchor
mask, FusionNet forward (CPU default widths) under the precision, WTA heatmap + neighbourhood
action + diversity losses, backward, gradient clipping and an AdamW step. Arms:

- precision: ``fp32``, ``bf16`` (autocast), ``bf16+cl`` (autocast, channels_last model and input);
- batching: ``bucketed`` (BucketBatchSampler: a batch holds one grid size, at its natural
  resolution) vs ``padded`` (the same batches zero-padded to ``--pad`` x ``--pad``, 32 = the
  largest CPU grid or 128 = the seed's layout, with the padding masked as the seed did).

Every arm trains its own model on the same list of batches. Arms run interleaved round-robin
(``--steps`` steps each per round), so load from other processes hits all arms alike; the
table gives the median and IQR over rounds of samples per second, and the speed-up against
fp32 bucketed.

    python benchmarks/fusion_train.py                       # builds a smoke dataset in a temp dir
    python benchmarks/fusion_train.py --data runs/fusion/data --pad 128 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from fusion import build_data  # noqa: E402
from fusion.batches import FusionSamples, model_inputs  # noqa: E402
from fusion.model import FusionNet  # noqa: E402

from blockyard.data import BucketBatchSampler, GroupedStore  # noqa: E402
from blockyard.losses import neighborhood_cross_entropy, wta_heatmap_loss  # noqa: E402
from blockyard.train import autocast, clip_gradients  # noqa: E402

PRECISIONS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+cl": ("bf16", True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset dir (default: a smoke dataset built in a temp dir)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--widths", default="16,32,64,64")
    p.add_argument("--pad", type=int, default=32, help="padded arm: pad every grid to this size (32 or 128)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DDP rank on a 2-core box)")
    p.add_argument("--arms", default="fp32,bf16,bf16+cl", help="precision arms")
    p.add_argument("--no-padded", action="store_true", help="skip the padded arms")
    return p.parse_args(argv)


class Arm:
    def __init__(self, name: str, precision: str, channels_last: bool, batches: list, widths: tuple[int, ...]) -> None:
        torch.manual_seed(0)
        self.name, self.precision, self.channels_last, self.batches = name, precision, channels_last, batches
        self.model = FusionNet(widths=widths)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=4e-4, weight_decay=1e-4)
        self.cursor = 0
        self.rates: list[float] = []

    def step(self) -> int:
        batch = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        inputs = model_inputs(batch, channels_last=self.channels_last)
        with autocast("cpu", self.precision):
            out = self.model(inputs.x, batch.history, batch.history_len, batch.initial_crossings)
        wta = wta_heatmap_loss(out.position, inputs.centers, inputs.mask, sigma=2.0)
        act = neighborhood_cross_entropy(out.action, inputs.centers, batch.target[:, 2], neighbor_weight=0.3,
                                         label_smoothing=0.2, center_label_smoothing=0.1, mask=inputs.mask)
        (5.0 * wta.loss + act + 0.5 * wta.diversity).backward()
        clip_gradients(self.model.parameters(), value=1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch.target.shape[0]

    def run(self, steps: int) -> None:
        start, samples = time.perf_counter(), 0
        for _ in range(steps):
            samples += self.step()
        self.rates.append(samples / (time.perf_counter() - start))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else build_data.ensure_dataset(Path(tmp) / "data", smoke=True)
        store = GroupedStore(Path(data) / "train", verify=False)
        # the same index batches for every arm: a few per grid size, in a fixed mixed order
        index_batches = list(BucketBatchSampler(store, args.batch_size, shuffle=True, seed=0, drop_last=True))
        index_batches = index_batches[: max(args.steps * 2, 12)]
        natural = FusionSamples(store, augment=False)
        padded = FusionSamples(store, augment=False, pad_to=args.pad)
        sets = [("bucketed", natural)] + ([] if args.no_padded else [(f"padded {args.pad}", padded)])
        arms = []
        for batching, dataset in sets:
            batches = [dataset.__getitems__(b) for b in index_batches]
            for name in args.arms.split(","):
                precision, channels_last = PRECISIONS[name]
                arms.append(Arm(f"{name:8s} {batching}", precision, channels_last, batches, widths))
        shapes = sorted({tuple(natural.__getitems__(b).state.shape[-2:]) for b in index_batches})
        print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, widths {widths}, "
              f"grids {shapes}, {args.rounds} rounds x {args.steps} steps per arm (interleaved)")
        for arm in arms:  # warm-up: oneDNN primitives for every shape, allocator
            for _ in range(min(len(arm.batches), 4)):
                arm.step()
        for _ in range(args.rounds):
            for arm in arms:
                arm.run(args.steps)
    base = statistics.median(arms[0].rates)
    print(f"\n{'arm':24s} {'samples/s':>10s} {'IQR':>17s} {'vs ' + arms[0].name.strip():>22s}")
    for arm in arms:
        q25, med, q75 = np.percentile(arm.rates, [25, 50, 75])
        print(f"{arm.name:24s} {med:10.1f} {f'[{q25:.1f}, {q75:.1f}]':>17s} {med / base:21.2f}x")


if __name__ == "__main__":
    main()
