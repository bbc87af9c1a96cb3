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
    python examples/mheight_moe.py --models resnet,moe,control       # the MoE beside its same-budget control
    python examples/mheight_moe.py --models resnet --log-channel 0   # ablations: --augment 0, --split row
    python examples/mheight_moe.py --models binned                   # the ResNet as a classifier over log2 h bins
    python examples/mheight_moe.py --study rows --seeds 0,1,2        # every row over 3 seeds: median [IQR]
    torchrun --standalone --nproc_per_node=2 examples/mheight_moe.py --resume auto

The MoE (--experts resnet|fcn, --gate hard|soft|topk, --top-k, --learn-temperature): when its
expert family was trained earlier in --models, every expert starts as a copy of that model and
the MoE is fine-tuned (--moe-epochs at --moe-lr); otherwise its experts start fresh and it trains
like any model (--epochs at --lr). ``control`` is that fine-tuning without the MoE: a copy of the
same trained model, the same --moe-epochs at --moe-lr with the same warmup-cosine restart, the same
batches and symmetries; the MoE's gain over it is the MoE's own. ``binned`` is the ResNet as a
classifier over Freedman-Diaconis bins of the training log2 h (cross-entropy; --bin-decode argmax,
the seed's bin midpoint, or mean). --input-scaling none feeds P, log2|P| and (n, k, m) raw (the
seed's best ResNet used no normalisation); --log-channel 0 drops the log2|P| channel; --augment 0
the random symmetries; --split row pools the rows and splits them at random, as the seed did, so
the rows of one code land on both sides (its effect: the leak).

--study rows trains every row of --rows (mheight/study.py: the families, the MoE gates and their
control, the classifier, the three ablations) once per seed of --seeds on one dataset (built with
--seed) and prints each row's median [IQR] and its paired difference from its reference row.

Defaults: --epochs 15 (every model trained from scratch), --batch-size 512 global; --smoke: 2 epochs, batch 64,
40 codes per (n, k), 8 channels x 1 block. Models predict log2 h standardised by the training mean
and std, so the loss is the Log2-MSE up to a constant factor. Writes to --out: data/ (unless
--data), <model>/metrics.jsonl and checkpoints (study/<config>/ under --study), summary.json and
groups.png (per-group Log2-MSE); --study rows: study/seed<S>/<row>/ and the table.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mheight.binned import DECODES, bin_edges, build_binned
from mheight.build_data import build
from mheight.evaluate import (
    Split,
    group_mean_baseline,
    group_table,
    per_group_log2_mse,
    plot_groups,
    routing,
    row_split,
    shared_code_rows,
)
from mheight.models import EXPERTS, GATES, MODELS, SCALINGS, MoE, augment, build_model, encode
from mheight.study import ROWS, grid, ints, rows_table, seeds, study_table

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
    p.add_argument("--log-channel", type=int, default=1, choices=[0, 1],
                   help="feed log2|P| as a second input channel (0: P alone)")
    p.add_argument("--split", default="code", choices=["code", "row"],
                   help="code: the built split, no code on two sides; row: the rows pooled and split at random "
                        "with the same sizes (the seed's split: a code's other m leak into validation and test)")
    p.add_argument("--bin-decode", default="argmax", choices=DECODES,
                   help="binned: predict the argmax bin's midpoint (the seed's) or the softmax-weighted mean")
    p.add_argument("--max-bins", type=int, default=None, help="binned: cap on the Freedman-Diaconis bin count")
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
    g = p.add_argument_group("studies (instead of --models)")
    g.add_argument("--study", default=None, choices=["fcn", "rows"],
                   help="fcn: one FCN per grid point (the seed's search); rows: every row of --rows per seed")
    g.add_argument("--rows", default=",".join(ROWS), help=f"rows of --study rows, from {list(ROWS)} (default all)")
    g.add_argument("--seeds", default="0,1,2", help="training seeds of --study rows (the data: --seed)")
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
    if "control" in args.models and args.experts not in args.models[:args.models.index("control")]:
        p.error(f"--models: control fine-tunes the trained --experts model ({args.experts}): list it before control")
    if args.learn_temperature and args.gate != "topk":
        p.error(f"--learn-temperature 1: only the topk gate has a temperature, got --gate {args.gate}")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.rows or any(r not in ROWS for r in args.rows):
        p.error(f"--rows: expected names from {list(ROWS)}, got {args.rows}")
    args.rows = [r for r in ROWS if r in args.rows]  # training order: the fine-tuned rows after their backbone
    if args.study == "rows" and (args.log_channel, args.augment, args.split) != (1, 1, "code"):
        p.error("--study rows: each row sets its own log channel, augmentation and split; leave those flags out")
    if args.study == "rows" and args.experts not in args.rows and {"control", "hard", "soft", "topk"} & set(args.rows):
        p.error(f"--rows: control, hard, soft and topk fine-tune this seed's trained {args.experts}: add it")
    try:
        args.grid = grid(args.grid_widths, args.grid_dropout, args.grid_lr) if args.study == "fcn" else []
        args.seeds = seeds(args.seeds)
    except ValueError as err:
        p.error(str(err))
    return args


def predict(model: nn.Module, split: Split, device: torch.device, precision: str, encoder) -> torch.Tensor:
    """log2 h predicted for every row of ``split`` (model in eval mode), sharded over the ranks, on every rank.

    ``encoder``: ``(matrix, side) -> Features``, ``encode`` with the run's scaling and log channel."""
    model.eval()
    broadcast_buffers(model)  # DDP leaves each rank its own BatchNorm running stats: evaluate rank 0's everywhere

    def rows_log2h(rows: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(*encoder(split.matrix[rows], split.side[rows])).value.float()

    return predict_rows(rows_log2h, split.n, batch_size=4096, device=device) * split.std + split.mean


def train_model(name: str, model: nn.Module, train: Split, val: Split, epochs: int, lr: float, args, info,
                run: RunDir, steps_before: int, *, seed: int, encoder, augment_rows: bool) -> dict:
    """Train one model with AdamW + warmup-cosine + early stopping; load its best weights; return its record.

    ``steps_before``: optimizer steps of the models trained before this one (``--kill-at-step`` counts them all);
    ``seed``: of the batch order and the symmetries; ``encoder``: as for :func:`predict`; ``augment_rows``: draw a
    random symmetry of every training row. A ``Binned`` model trains on the cross-entropy of its bins.
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
        order = rank_batches(train.n, per_rank, epoch, seed, info.rank, info.world_size).to(device)
        aug_gen.manual_seed((seed * 1000 + epoch) * info.world_size + info.rank)
        ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, rows in enumerate(order):
            step_lr = stepper.lr  # the lr this step uses (the schedule moves on after it)
            with stepper.micro_batch(i) as mb:
                matrix = augment(train.matrix[rows], train.shape[rows], aug_gen) if augment_rows else train.matrix[rows]
                with autocast(device, args.precision):
                    pred = ddp(*encoder(matrix, train.side[rows]))
                z = train.z[rows]
                loss = model.loss(pred, z) if pred.logits is not None else (pred.value.float() - z).square().mean()
                stepper.backward(loss + args.aux_weight * pred.aux_loss)
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, steps_before + stepper.steps)
            loss_sum += loss.detach().double()
            dash.update(stepper.steps, epoch=epoch, loss=loss.detach())
        val_metrics = per_group_log2_mse(predict(model, val, device, args.precision, encoder), val)
        train_name, train_loss = (("train_cross_entropy", float(loss_sum) / steps_per_epoch) if pred.logits is not None
                                  else ("train_log2_mse", float(loss_sum) / steps_per_epoch * train.std**2))
        record = {"epoch": epoch, "opt_step": stepper.steps, train_name: train_loss,
                  "val_log2_mse": val_metrics["overall"], "lr": step_lr, "time_s": time.perf_counter() - t0}
        log.log(epoch, **record)
        dash.write(f"{name} epoch {epoch}/{epochs}: {train_name} {train_loss:.4f}, val_log2_mse "
                   f"{record['val_log2_mse']:.4f}")
        stopper.step(record["val_log2_mse"])  # every rank has the same gathered validation: same decision
        ckpt.save(epoch, {**state, "epoch": epoch}, metric=record["val_log2_mse"])
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    best = ckpt.load_best({"model": model})  # every rank: the later stages start from the same weights
    return {"parameters": count_parameters(model), "best_epoch": best["epoch"] if best else None,
            "epochs_run": len(records), "optimizer_steps": stepper.steps, "train_time_s": time.perf_counter() - t0}


def moe_record(model: MoE, args, gate: str, val: Split) -> dict:
    """What the MoE was (gate, experts) and how it routes validation rows."""
    temperature = getattr(model.moe.gate, "log_temperature", None)
    return {"experts": args.experts, "gate": gate, "top_k": args.top_k if gate == "topk" else None,
            "routing_val": routing(model, val, args.input_scaling),
            "temperature": None if temperature is None else float(temperature.detach().exp())}


def describe_moe(args, gate: str, backbone: str | None) -> str:
    if gate == "topk":
        gate = f"top-{args.top_k}" + (" (learned temperature)" if args.learn_temperature else "")
    start = f"every expert a copy of the trained {backbone}" if backbone else "experts from scratch"
    return f"moe: 6 {args.experts} experts, {gate} gate, {start}"


def make_model(name: str, trained: dict[str, nn.Module], args, *, gate: str, in_channels: int, train: Split):
    """One model of MODELS, its epochs and lr, and the name of the trained model it starts from (None: fresh).

    The MoE starts from the trained ``--experts`` model when there is one (the seed's recipe: every expert a copy);
    ``control`` is a copy of that same model, fine-tuned on the MoE's budget (--moe-epochs at --moe-lr) without
    a gate. ``binned`` bins the training split's log2 h.
    """
    if name == "control":
        return copy.deepcopy(trained[args.experts]), args.moe_epochs, args.moe_lr, args.experts
    moe_gate = {"gate": gate, "k": args.top_k, "learn_temperature": bool(args.learn_temperature) and gate == "topk"}
    if name == "moe" and args.experts in trained:
        return MoE.from_backbone(trained[args.experts].net, **moe_gate), args.moe_epochs, args.moe_lr, args.experts
    if name == "binned":
        edges = bin_edges(train.log2h, train.mean, train.std, args.max_bins)
        return build_binned(edges, args.channels, args.blocks, in_channels, args.bin_decode), args.epochs, args.lr, None
    model = build_model(name, args.channels, args.blocks, fcn_widths=args.fcn_widths, fcn_dropout=args.fcn_dropout,
                        experts=args.experts, in_channels=in_channels, **moe_gate)
    return model, args.epochs, args.lr, None


def fit(path: str, name: str, trained, splits, args, info, run, steps_done: int, *, seed: int, gate: str,
        log_channel: bool, augment_rows: bool) -> tuple[nn.Module, dict]:
    """Build one model of MODELS (``make_model``), train it, evaluate it per group on validation and test."""
    say, (train, val, test) = main_print(info.is_main), splits
    torch.manual_seed(seed)
    model, epochs, lr, start = make_model(name, trained, args, gate=gate, in_channels=1 + log_channel, train=train)
    if name == "moe":
        say(describe_moe(args, gate, start))
    model = model.to(info.device)
    encoder = partial(encode, scaling=args.input_scaling, log_channel=log_channel)
    record = train_model(path, model, train, val, epochs, lr, args, info, run, steps_done, seed=seed, encoder=encoder,
                         augment_rows=augment_rows)
    for split_name, split in (("val", val), ("test", test)):
        record[split_name] = per_group_log2_mse(predict(model, split, info.device, args.precision, encoder), split)
    record["initialised_from"] = start
    say(f"{path}: {record['parameters']:,} parameters, best epoch {record['best_epoch']}, val Log2-MSE "
        f"{record['val']['overall']:.4f}, test {record['test']['overall']:.4f} ({record['train_time_s']:.0f} s)")
    if name == "binned":
        record["bins"] = model.num_bins
    if name == "moe":
        record.update(moe_record(model, args, gate, val))
        say(f"{path} routing, mean gate weight per expert on validation rows: " + "; ".join(
            f"{nk} {' '.join(f'{w:.2f}' for w in ws)}" for nk, ws in record["routing_val"].items())
            + ("" if record["temperature"] is None else f"; temperature {record['temperature']:.3f}"))
    return model, record


def train_study(args, splits, info, run) -> list[dict]:
    """The seed's FCN search: one FCN per grid point, each from the same seed; one record per point."""
    study, steps_done = [], 0
    for point in args.grid:
        point_args = copy.copy(args)
        point_args.fcn_widths, point_args.fcn_dropout, point_args.lr = point.widths, point.dropout, point.lr
        _, record = fit(f"study/{point.name}", "fcn", {}, splits, point_args, info, run, steps_done, seed=args.seed,
                        gate=args.gate, log_channel=bool(args.log_channel), augment_rows=bool(args.augment))
        steps_done += record["optimizer_steps"]
        study.append({**point._asdict(), **record})
    return study


def train_rows(args, splits_by: dict[str, tuple[Split, Split, Split]], info, run) -> list[dict]:
    """--study rows: every row of --rows (``ROWS``) for every seed; one record per (row, seed)."""
    records, steps_done = [], 0
    for seed in args.seeds:
        trained = {}  # this seed's models: the MoE rows and the control start from its --experts row
        for name in args.rows:
            row = ROWS[name]
            trained[name], record = fit(f"study/seed{seed}/{name}", row.model, trained, splits_by[row.split], args,
                                        info, run, steps_done, seed=seed, gate=row.gate or args.gate,
                                        log_channel=row.log_channel, augment_rows=row.augment)
            steps_done += record["optimizer_steps"]
            records.append({"row": name, "seed": seed, **record})
    return records


def train_models(args, splits, info, run) -> dict[str, dict]:
    """Every model of --models in order; the MoE and the control start from the trained --experts model."""
    results, trained, steps_done = {}, {}, 0
    for name in args.models:
        trained[name], results[name] = fit(name, name, trained, splits, args, info, run, steps_done, seed=args.seed,
                                           gate=args.gate, log_channel=bool(args.log_channel),
                                           augment_rows=bool(args.augment))
        steps_done += results[name]["optimizer_steps"]
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
    train = Split.load(data_dir / "train", device)
    by_code = (train, Split.load(data_dir / "val", device, train.mean, train.std),
               Split.load(data_dir / "test", device, train.mean, train.std))
    # the seed's split (rows dealt at random, the same sizes) for --split row and the study's rowsplit row
    splits_by = {"code": by_code}
    if args.split == "row" or (args.study == "rows" and "rowsplit" in args.rows):
        splits_by["row"] = row_split(by_code, seed=args.seed)
    leaks = {split: {"val": shared_code_rows(s[1], s[0]), "test": shared_code_rows(s[2], s[0])}
             for split, s in splits_by.items()}
    train, val, test = splits = splits_by[args.split]
    say(f"rows: train {train.n}, val {val.n}, test {test.n} (split by {args.split}: {leaks[args.split]['val']:.0%} "
        f"of val rows have their code in train); log2 h mean {train.mean:.2f} std {train.std:.2f}; world "
        f"{info.world_size} on {device}, {args.precision}, {args.input_scaling} inputs")

    # --- baseline, then the FCN study, the rows over seeds or the models -------------------------
    baselines = {split: {"val": per_group_log2_mse(group_mean_baseline(s[0], s[1]), s[1]),
                         "test": per_group_log2_mse(group_mean_baseline(s[0], s[2]), s[2])}
                 for split, s in splits_by.items()}
    baseline = baselines[args.split]
    if args.study == "fcn":
        study = train_study(args, splits, info, run)
        table, results = study_table(study, baseline), {"study": study, "group mean": baseline}
    elif args.study == "rows":
        study = train_rows(args, splits_by, info, run)
        table, results = rows_table(study, baselines), {"study": study, "group mean": baselines}
    else:
        results = {"group mean": baseline, **train_models(args, splits, info, run)}
        table, results = group_table(results), {"results": results}

    # --- report -----------------------------------------------------------------------------------
    if is_main:
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device),
                   "rows": {"train": train.n, "val": val.n, "test": test.n}, "shared_code_rows": leaks,
                   "log2h": {"mean": train.mean, "std": train.std}, **results, "table": table}
        if not args.study and (plt := pyplot()) is not None:
            summary["plots"] = [str(plot_groups(plt, results["results"], run.file("groups.png")))]
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


if __name__ == "__main__":
    main()
