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
    python examples/mheight_moe.py --models fcn,moe --experts fcn --gate soft   # FCN experts from the FCN
    python examples/mheight_moe.py --models moe --experts fcn --gate hard       # one FCN per (n, k)
    python examples/mheight_moe.py --top-k 1 --learn-temperature 1   # top-1 gate, learned temperature
    python examples/mheight_moe.py --study fcn                       # the seed's FCN grid search, as a table
    torchrun --standalone --nproc_per_node=2 examples/mheight_moe.py --resume auto

The MoE (--experts resnet|fcn, --gate hard|soft|topk, --top-k, --learn-temperature): when its
expert family was trained earlier in --models, every expert starts as a copy of that model and
the MoE is fine-tuned (--moe-epochs at --moe-lr); otherwise its experts start fresh and it trains
like any model (--epochs at --lr). --input-scaling none feeds P, log2|P| and (n, k, m) raw (the
seed's best ResNet used no normalisation).

Defaults: --epochs 15 (every model trained from scratch), --batch-size 512 global; --smoke: 2 epochs, batch 64,
40 codes per (n, k), 8 channels x 1 block. Models predict log2 h standardised by the training mean
and std, so the loss is the Log2-MSE up to a constant factor. Writes to --out: data/ (unless
--data), <model>/metrics.jsonl and checkpoints (study/<config>/ under --study), summary.json and
groups.png (per-group Log2-MSE).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mheight.build_data import build
from mheight.evaluate import Split, group_mean_baseline, group_table, per_group_log2_mse, plot_groups, routing
from mheight.models import EXPERTS, GATES, MODELS, SCALINGS, MoE, augment, build_model, encode
from mheight.study import grid, ints, study_table

from blockyard.blocks import count_parameters
from blockyard.data import rank_batches
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
    p.add_argument("--fcn-widths", type=ints, default=(512, 256, 128),
                   help="FCN hidden widths (default 512,256,128: the seed's best)")
    p.add_argument("--fcn-dropout", type=float, default=0.3, help="FCN dropout (default 0.3: the seed's best)")
    p.add_argument("--input-scaling", default="standard", choices=SCALINGS,
                   help="standard: P / 100, log2|P| / 7, centred (n, k, m); none: all raw (the seed's best ResNet)")
    g = p.add_argument_group("mixture of experts (six experts, gated by (n, k))")
    g.add_argument("--experts", default="resnet", choices=EXPERTS, help="expert family")
    g.add_argument("--gate", default="topk", choices=GATES,
                   help="hard: one expert per (n, k); soft: dense softmax blend; topk: sparse top-k")
    g.add_argument("--top-k", type=int, default=2, choices=range(1, 7), metavar="{1..6}",
                   help="experts per row of the topk gate (seed: 2 best, 1 tried)")
    g.add_argument("--learn-temperature", type=int, default=0, choices=[0, 1],
                   help="topk gate: divide its logits by a learned temperature (1 at init)")
    g = p.add_argument_group("FCN study (the seed's grid search of widths, dropout and learning rate)")
    g.add_argument("--study", default=None, choices=["fcn"],
                   help="train one FCN per grid point instead of --models and print the table")
    g.add_argument("--grid-widths", default="128,64,32;512,256,128",
                   help="';'-separated width lists (default 128,64,32;512,256,128)")
    g.add_argument("--grid-dropout", default="0,0.3", help="comma-separated dropouts (default 0,0.3)")
    g.add_argument("--grid-lr", default="5e-4,1e-3", help="comma-separated learning rates (default 5e-4,1e-3)")
    args = p.parse_args(argv)
    for key, (full, smoke) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: expected names from {MODELS}, got {bad or args.models}")
    if args.learn_temperature and args.gate != "topk":
        p.error(f"--learn-temperature 1: only the topk gate has a temperature, got --gate {args.gate}")
    try:
        args.grid = grid(args.grid_widths, args.grid_dropout, args.grid_lr) if args.study else []
    except ValueError as err:
        p.error(str(err))
    return args


def predict(model: nn.Module, split: Split, device: torch.device, precision: str, scaling: str) -> torch.Tensor:
    """log2 h predicted for every row of ``split`` (model in eval mode), sharded over the ranks, on every rank."""
    model.eval()
    broadcast_buffers(model)  # DDP leaves each rank its own BatchNorm running stats: evaluate rank 0's everywhere

    def rows_log2h(rows: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(*encode(split.matrix[rows], split.side[rows], scaling)).value.float()

    return predict_rows(rows_log2h, split.n, batch_size=4096, device=device) * split.std + split.mean


def train_model(name: str, model: nn.Module, train: Split, val: Split, epochs: int, lr: float, args, info,
                run: RunDir, steps_before: int) -> dict:
    """Train one model with AdamW + warmup-cosine + early stopping; load its best weights; return its record.

    ``steps_before``: optimizer steps of the models trained before this one (``--kill-at-step`` counts them all).
    """
    device, say = info.device, main_print(info.is_main)
    # Sparse experts leave some parameters without a gradient on a step: DDP must be told.
    ddp = wrap_ddp(model, info, find_unused_parameters=isinstance(model, MoE) and model.sparse)
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
                with autocast(device, args.precision):
                    pred = ddp(*encode(matrix, train.side[rows], args.input_scaling))
                loss = (pred.value.float() - train.z[rows]).square().mean()
                stepper.backward(loss + args.aux_weight * pred.aux_loss)
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, steps_before + stepper.steps)
            loss_sum += loss.detach().double()
            dash.update(stepper.steps, epoch=epoch, loss=loss.detach())
        val_metrics = per_group_log2_mse(predict(model, val, device, args.precision, args.input_scaling), val)
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


def moe_record(model: MoE, args, backbone: str | None, val: Split) -> dict:
    """What the MoE was (gate, experts, initialisation) and how it routes validation rows."""
    temperature = getattr(model.moe.gate, "log_temperature", None)
    return {"experts": args.experts, "gate": args.gate, "top_k": args.top_k if args.gate == "topk" else None,
            "initialised_from": backbone, "routing_val": routing(model, val, args.input_scaling),
            "temperature": None if temperature is None else float(temperature.detach().exp())}


def describe_moe(args, backbone: str | None) -> str:
    gate = args.gate
    if gate == "topk":
        gate = f"top-{args.top_k}" + (" (learned temperature)" if args.learn_temperature else "")
    start = f"every expert a copy of the trained {backbone}" if backbone else "experts from scratch"
    return f"moe: 6 {args.experts} experts, {gate} gate, {start}"


def train_and_evaluate(name, model, epochs, lr, splits, args, info, run, steps_done) -> dict:
    """Train one model (``train_model``), then its per-group Log2-MSE on validation and test."""
    train, val, test = splits
    record = train_model(name, model, train, val, epochs, lr, args, info, run, steps_done)
    for split_name, split in (("val", val), ("test", test)):
        record[split_name] = per_group_log2_mse(predict(model, split, info.device, args.precision,
                                                        args.input_scaling), split)
    main_print(info.is_main)(f"{name}: {record['parameters']:,} parameters, best epoch {record['best_epoch']}, val "
                             f"Log2-MSE {record['val']['overall']:.4f}, test {record['test']['overall']:.4f} "
                             f"({record['train_time_s']:.0f} s)")
    return record


def train_study(args, splits, info, run) -> list[dict]:
    """The seed's FCN search: one FCN per grid point, each from the same seed; one record per point."""
    study, steps_done = [], 0
    for point in args.grid:
        torch.manual_seed(args.seed)
        model = build_model("fcn", fcn_widths=point.widths, fcn_dropout=point.dropout).to(info.device)
        record = train_and_evaluate(f"study/{point.name}", model, args.epochs, point.lr, splits, args, info, run,
                                    steps_done)
        steps_done += record["optimizer_steps"]
        study.append({**point._asdict(), **record})
    return study


def train_models(args, splits, info, run) -> dict[str, dict]:
    """Every model of --models in order; the MoE starts from its expert family's model when one was trained."""
    say, results, trained, steps_done = main_print(info.is_main), {}, {}, 0
    for name in args.models:
        torch.manual_seed(args.seed)
        backbone = args.experts if name == "moe" and args.experts in trained else None
        gate = {"gate": args.gate, "k": args.top_k, "learn_temperature": bool(args.learn_temperature)}
        if backbone:  # the seed's recipe: every expert a copy of the trained model, then fine-tuned together
            model, epochs, lr = MoE.from_backbone(trained[backbone].net, **gate), args.moe_epochs, args.moe_lr
        else:
            model = build_model(name, args.channels, args.blocks, fcn_widths=args.fcn_widths,
                                fcn_dropout=args.fcn_dropout, experts=args.experts, **gate)
            epochs, lr = args.epochs, args.lr
        if name == "moe":
            say(describe_moe(args, backbone))
        model = model.to(info.device)
        record = train_and_evaluate(name, model, epochs, lr, splits, args, info, run, steps_done)
        steps_done += record["optimizer_steps"]
        if name == "moe":
            record.update(moe_record(model, args, backbone, splits[1]))
            say("moe routing, mean gate weight per expert on validation rows: " + "; ".join(
                f"{nk} {' '.join(f'{w:.2f}' for w in ws)}" for nk, ws in record["routing_val"].items())
                + ("" if record["temperature"] is None else f"; temperature {record['temperature']:.3f}"))
        trained[name] = model
        results[name] = record
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    per_rank_batch(args.batch_size, info.world_size)  # a global batch that does not divide fails before any write
    run = RunDir(args.out, run_config(args, ignore=("data", "workers", "grid")), resume=args.resume,
                 overwrite=args.overwrite)
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
        f"std {train.std:.2f}; world {info.world_size} on {device}, {args.precision}, {args.input_scaling} inputs")

    # --- baseline, then the FCN study or the models ----------------------------------------------
    baseline = {"val": per_group_log2_mse(group_mean_baseline(train, val), val),
                "test": per_group_log2_mse(group_mean_baseline(train, test), test)}
    if args.study:
        study = train_study(args, (train, val, test), info, run)
        table, results = study_table(study, baseline), {"study": study, "group mean": baseline}
    else:
        results = {"group mean": baseline, **train_models(args, (train, val, test), info, run)}
        table, results = group_table(results), {"results": results}

    # --- report -----------------------------------------------------------------------------------
    if is_main:
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device),
                   "rows": {"train": train.n, "val": val.n, "test": test.n},
                   "log2h": {"mean": train.mean, "std": train.std}, **results, "table": table}
        if not args.study and (plt := pyplot()) is not None:
            summary["plots"] = [str(plot_groups(plt, results["results"], run.file("groups.png")))]
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


if __name__ == "__main__":
    main()
