"""m-height regression of analog linear codes with a sparse mixture of ResNet experts.

System: m-height regression. For a real [n, k] code with systematic generator G = [I_k | P], the
m-height h_m is the largest ratio, over non-zero codewords, of the largest magnitude to the
(m+1)-th largest. The seed trained networks on (P, n, k, m) to predict it (Log2-MSE), and its best
model was a sparse top-2 mixture of ResNet experts gated by (n, k), every expert initialised from
one trained ResNet.

This script builds an exact dataset if it is missing (examples/mheight/build_data.py: P ~
U[-100, 100], exact heights by vertex enumeration, split by code), reports the honest baseline
(predict each (n, k, m) group's mean log2 h from the training split), then trains the requested
models in order and evaluates every one per group on validation and test:

    python examples/mheight_moe.py                                   # resnet, then the MoE from it
    python examples/mheight_moe.py --models fcn,resnet,vit,moe       # the seed's four families
    torchrun --standalone --nproc_per_node=2 examples/mheight_moe.py --resume auto

Defaults: --epochs 15 (every non-MoE model), --batch-size 512 global; --smoke: 2 epochs, batch 64,
40 codes per (n, k), 8 channels x 1 block. Models predict log2 h standardised by the training mean
and std, so the loss is the Log2-MSE up to a constant factor. Writes to --out: data/ (unless
--data), <model>/metrics.jsonl and checkpoints, summary.json and groups.png (per-group Log2-MSE).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mheight.build_data import build
from mheight.heights import GROUPS
from mheight.models import MODELS, ResNetMoE, augment, build_model, encode

from blockyard.blocks import count_parameters
from blockyard.data import ShardDataset, rank_batches
from blockyard.train import Dashboard, EarlyStopping, RunDir, Stepper, autocast, seed_everything, warmup_cosine
from blockyard.train.cli import add_common_args, kill_point, main_print, per_rank_batch, pyplot, run_config
from blockyard.train.distributed import barrier, broadcast_buffers, setup_distributed, teardown_distributed, wrap_ddp
from blockyard.train.gather import predict_rows

#: flag -> (default, default under --smoke)
SIZES = {"codes_per_group": (8000, 40), "epochs": (15, 2), "moe_epochs": (6, 2), "batch_size": (512, 64),
         "channels": (32, 8), "blocks": (3, 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/mheight", lr=1e-3, precision="bf16")  # --lr: of the non-MoE models (seed: 3e-3)
    p.add_argument("--data", default=None, help="dataset directory (default OUT/data; built if missing)")
    p.add_argument("--models", default="resnet,moe", help=f"comma-separated, trained in order, from {MODELS}")
    p.add_argument("--codes-per-group", type=int, default=None, help="codes per (n, k) (default 8000, 40 smoke)")
    p.add_argument("--moe-epochs", type=int, default=None, help="MoE fine-tuning epochs (default 6, 2 smoke)")
    p.add_argument("--moe-lr", type=float, default=3e-4, help="AdamW lr of the MoE fine-tuning")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps as a fraction of a model's steps")
    p.add_argument("--augment", type=int, default=1, choices=[0, 1],
                   help="random row/column permutations and sign flips of P (they leave every h_m unchanged)")
    p.add_argument("--aux-weight", type=float, default=0.0, help="weight of the gate's balance loss (seed: none)")
    p.add_argument("--channels", type=int, default=None, help="ResNet width (default 32, 8 smoke; seed: 64 best)")
    p.add_argument("--blocks", type=int, default=None, help="ResNet blocks (default 3, 1 smoke; seed: 5 best)")
    p.add_argument("--patience", type=int, default=8, help="early stopping on validation Log2-MSE")
    p.add_argument("--workers", type=int, default=1, help="dataset build processes (1 is fastest on 2 cores)")
    args = p.parse_args(argv)
    for key, (full, smoke) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: expected names from {MODELS}, got {bad or args.models}")
    return args


class Split:
    """One split in memory: raw padded P (N, 6, 6), its true shape (N, 2), side (N, 3), z (N,), group (N,)."""

    def __init__(self, folder: Path, device: torch.device, mean: float | None = None, std: float | None = None):
        ds = ShardDataset(folder)
        self.log2h = ds.column("target").double().log2()
        self.mean = float(self.log2h.mean()) if mean is None else mean
        self.std = float(self.log2h.std()) if std is None else std
        self.matrix = ds.column("matrix").float().to(device)
        self.shape = ds.column("shape").long().to(device)  # true (k, n - k), for the augmentation
        self.side = ds.column("side").float().to(device)
        self.z = ((self.log2h - self.mean) / self.std).float().to(device)
        self.group = ds.column("group").long().to(device)
        self.n = len(ds)


def group_means(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, k, m) mean of ``values`` (float64, 0 for an empty group) and each group's row count."""
    group = group.cpu()
    counts = torch.bincount(group, minlength=len(GROUPS)).double()
    sums = torch.zeros(len(GROUPS), dtype=torch.float64).index_add_(0, group, values.double().cpu())
    return sums / counts.clamp_min(1), counts


def per_group_log2_mse(pred_log2h: torch.Tensor, split: Split) -> dict:
    """Overall and per-(n, k, m) Log2-MSE of predictions of log2 h (float64)."""
    err = (pred_log2h.double().cpu() - split.log2h).square()
    means, counts = group_means(err, split.group)
    return {"overall": float(err.mean()),
            "groups": {str(g): float(m) for g, m, c in zip(GROUPS, means, counts) if c > 0}}


def predict(model: nn.Module, split: Split, device: torch.device, precision: str) -> torch.Tensor:
    """log2 h predicted for every row of ``split`` (model in eval mode), sharded over the ranks, on every rank."""
    model.eval()
    broadcast_buffers(model)  # DDP leaves each rank its own BatchNorm running stats: evaluate rank 0's everywhere

    def rows_log2h(rows: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(*encode(split.matrix[rows], split.side[rows])).value.float()

    return predict_rows(rows_log2h, split.n, batch_size=4096, device=device) * split.std + split.mean


def train_model(name: str, model: nn.Module, train: Split, val: Split, epochs: int, lr: float, args, info,
                run: RunDir, steps_before: int) -> dict:
    """Train one model with AdamW + warmup-cosine + early stopping; load its best weights; return its record.

    ``steps_before``: optimizer steps of the models trained before this one (``--kill-at-step`` counts them all).
    """
    device, say = info.device, main_print(info.is_main)
    # Sparse experts leave some parameters without a gradient on a step: DDP must be told.
    ddp = wrap_ddp(model, info, find_unused_parameters=isinstance(model, ResNetMoE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    steps_per_epoch = train.n // args.batch_size  # drop_last: every rank the same count
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is larger than the training split ({train.n} rows)")
    total = epochs * steps_per_epoch
    warmup = min(int(args.warmup * total), total - 1)
    stepper = Stepper(ddp, optimizer, precision=args.precision, num_batches=steps_per_epoch, clip_value=1.0,
                      schedule=lambda step: warmup_cosine(step, total, warmup, lr, min_lr=0.01 * lr))
    stopper = EarlyStopping(args.patience)
    ckpt = run.checkpoints(f"{name}/checkpoints", keep_last=1)
    state = {"model": model, "optimizer": optimizer, "stepper": stepper, "stopper": stopper}
    resumed = run.resume_from(ckpt, state)  # None: this model starts fresh
    start = resumed["epoch"] + 1 if resumed else 1
    if resumed:
        say(f"{name}: resumed from {resumed['path']} (epoch {resumed['epoch']}, step {stepper.steps})")
    log = run.metrics_log(f"{name}/metrics.jsonl", resumed, key="epoch")
    aug_gen = torch.Generator()
    dash = Dashboard(total, every_s=15, is_main=info.is_main, desc=f"{name} ")
    t0 = time.perf_counter()
    for epoch in range(start, epochs + 1):
        if stopper.stopped:
            break
        # the same permutation on every rank and after a resume; each rank its own slice of every batch
        order = rank_batches(train.n, per_rank, epoch, args.seed, info.rank, info.world_size).to(device)
        aug_gen.manual_seed((args.seed * 1000 + epoch) * info.world_size + info.rank)
        ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, rows in enumerate(order):
            step_lr = stepper.lr  # the lr this step uses (the schedule moves on after it)
            with stepper.micro_batch(i) as mb:
                matrix = augment(train.matrix[rows], train.shape[rows], aug_gen) if args.augment else train.matrix[rows]
                x, side = encode(matrix, train.side[rows])
                with autocast(device, args.precision):
                    pred = ddp(x, side)
                loss = (pred.value.float() - train.z[rows]).square().mean()
                stepper.backward(loss + args.aux_weight * pred.aux_loss)
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, steps_before + stepper.steps)
            loss_sum += loss.detach().double()
            dash.update(stepper.steps, epoch=epoch, loss=loss.detach())
        val_metrics = per_group_log2_mse(predict(model, val, device, args.precision), val)
        record = {"epoch": epoch, "opt_step": stepper.steps,
                  "train_log2_mse": float(loss_sum) / steps_per_epoch * train.std**2,
                  "val_log2_mse": val_metrics["overall"], "lr": step_lr, "time_s": time.perf_counter() - t0}
        log.log(epoch, **record)
        dash.write(f"{name} epoch {epoch}/{epochs}: train {record['train_log2_mse']:.4f} "
                   f"val {record['val_log2_mse']:.4f} Log2-MSE")
        stopper.step(record["val_log2_mse"])  # every rank has the same gathered validation: same decision
        ckpt.save(epoch, {**state, "epoch": epoch}, metric=record["val_log2_mse"])
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    best = ckpt.load_best({"model": model})  # every rank: the later stages start from the same weights
    return {"parameters": count_parameters(model), "best_epoch": best["epoch"] if best else None,
            "epochs_run": len(records), "optimizer_steps": stepper.steps, "train_time_s": time.perf_counter() - t0}


def group_mean_baseline(train: Split, split: Split) -> torch.Tensor:
    """Predict each (n, k, m) group's training mean of log2 h."""
    return group_means(train.log2h, train.group)[0][split.group.cpu()]


def plot_groups(plt, results: dict, path: Path) -> Path:
    """Bar chart of validation Log2-MSE per (n, k, m) group for every model."""
    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(14, 4))
    for i, name in enumerate(names):
        values = [results[name]["val"]["groups"].get(str(g), math.nan) for g in GROUPS]
        ax.bar([j + i * width for j in range(len(GROUPS))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(GROUPS))], [str(g) for g in GROUPS], rotation=60)
    ax.set_ylabel("validation Log2-MSE")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    per_rank_batch(args.batch_size, info.world_size)  # a global batch that does not divide fails before any write
    run = RunDir(args.out, run_config(args, ignore=("data", "workers")), resume=args.resume, overwrite=args.overwrite)
    device, is_main = info.device, info.is_main
    say = main_print(is_main)
    seed_everything(args.seed)  # every rank builds the same initial weights

    # --- data: rank 0 builds the exact dataset once, the others wait -------------------------
    data_dir = Path(args.data) if args.data else run.path / "data"  # a cache, not a file of the run
    if is_main:
        t0 = time.perf_counter()
        build(data_dir, codes_per_group=args.codes_per_group, seed=args.seed, workers=args.workers)
        say(f"dataset: {data_dir} ready in {time.perf_counter() - t0:.1f} s")
    barrier()
    train = Split(data_dir / "train", device)
    val = Split(data_dir / "val", device, train.mean, train.std)
    test = Split(data_dir / "test", device, train.mean, train.std)
    say(f"rows: train {train.n}, val {val.n}, test {test.n} (split by code); log2 h mean {train.mean:.2f} "
        f"std {train.std:.2f}; world {info.world_size} on {device}, {args.precision}")

    # --- baseline and models --------------------------------------------------------------------
    results = {"group mean": {"val": per_group_log2_mse(group_mean_baseline(train, val), val),
                              "test": per_group_log2_mse(group_mean_baseline(train, test), test)}}
    trained: dict[str, nn.Module] = {}
    steps_done = 0
    for name in args.models:
        torch.manual_seed(args.seed)
        if name == "moe" and "resnet" in trained:  # the seed's recipe: every expert a copy of the ResNet
            model = ResNetMoE.from_backbone(trained["resnet"].net)
        else:
            model = build_model(name, args.channels, args.blocks)
        model = model.to(device)
        epochs, lr = (args.moe_epochs, args.moe_lr) if name == "moe" else (args.epochs, args.lr)
        record = train_model(name, model, train, val, epochs, lr, args, info, run, steps_done)
        steps_done += record["optimizer_steps"]
        trained[name] = model
        record["val"] = per_group_log2_mse(predict(model, val, device, args.precision), val)
        record["test"] = per_group_log2_mse(predict(model, test, device, args.precision), test)
        results[name] = record
        say(f"{name}: {record['parameters']:,} parameters, best epoch {record['best_epoch']}, val Log2-MSE "
            f"{record['val']['overall']:.4f}, test {record['test']['overall']:.4f} "
            f"({record['train_time_s']:.0f} s)")

    # --- report -----------------------------------------------------------------------------------
    if is_main:
        names = list(results)
        header = f"{'(n,k,m)':<12}" + "".join(f"{n:>12}" for n in names)
        lines = ["validation Log2-MSE per group (lower is better)", header, "-" * len(header)]
        for g in GROUPS:
            cells = [results[n]["val"]["groups"].get(str(g), math.nan) for n in names]
            lines.append(f"{g!s:<12}" + "".join(f"{c:>12.3f}" for c in cells))
        lines.append("-" * len(header))
        for split in ("val", "test"):
            lines.append(f"{split + ' all':<12}" + "".join(f"{results[n][split]['overall']:>12.4f}" for n in names))
        table = "\n".join(lines)
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device),
                   "rows": {"train": train.n, "val": val.n, "test": test.n},
                   "log2h": {"mean": train.mean, "std": train.std}, "results": results, "table": table}
        if (plt := pyplot()) is not None:
            summary["plots"] = [str(plot_groups(plt, results, run.file("groups.png")))]
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


if __name__ == "__main__":
    main()
