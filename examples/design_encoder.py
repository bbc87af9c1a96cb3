"""Design decomposition, stage 1 (Module 5): a U-Net encoder from a rendered design to its structure map F.

System: design decomposition. Synthetic designs (examples/design/: jittered layouts of text,
images and call-to-action buttons in 4 formats, 6 palettes) are rendered to RGB and to the
ground-truth structure map F (text ink mask, image mask, colour class with the background as
class 0, per-element hierarchy). The encoder (examples/design/models.py) is a blockyard UNet with
four heads, trained with the seed's composite loss

    L = Dice(text) + Dice(image) + 0.5 CE(colour) + MSE(hierarchy)

and evaluated on held-out designs against the seed's success criteria (text IoU > 0.90, image
IoU > 0.85, colour accuracy > 0.80, hierarchy MSE < 0.05) and against predicting the empty
design (every pixel background), which already scores the background's share of colour accuracy,
so the table also reports colour accuracy on non-background pixels.

    python examples/design_encoder.py                            # 64 px, widths 16,32,64, 1 epoch
    python examples/design_encoder.py --smoke --out /tmp/encoder
    torchrun --standalone --nproc_per_node=2 examples/design_encoder.py --resume auto
    python examples/design_encoder.py --seed-scale               # 256 px, widths 64..1024 (a GPU)

Defaults: 20,000 designs at 64 px (16,000 for training; data built on first use in OUT/../data),
1 epoch of AdamW at --lr 3e-3 with warmup-cosine, global batch 32, fp32. --smoke: 300 designs, widths 8,16,
3 epochs of batch 8 at lr 1e-2. --seed-scale: the seed's 256 px and widths (64, 128, 256, 512, 1024),
10,000 designs, 10 epochs at lr 1e-3.

Writes to --out: run.json, model.json and checkpoints/ (read by design/models.py's load_encoder),
metrics.jsonl, summary.json, predictions.png (input, truth and prediction of held-out designs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from design.evaluate import structure_rows, structure_scores
from design.models import MODEL_FILE, DesignEncoder
from design.plots import plot_structures
from design.stage import add_data_args, data_dir, open_data

from blockyard.blocks import count_parameters
from blockyard.data import rank_batches
from blockyard.losses import CompositeLoss, dice_loss
from blockyard.train import (
    Dashboard,
    RunDir,
    Stepper,
    add_common_args,
    all_reduce_sum,
    autocast,
    broadcast_buffers,
    kill_point,
    main_print,
    per_rank_batch,
    predict_rows,
    pyplot,
    run_config,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    warmup_cosine,
    wrap_ddp,
)

#: flag -> (CPU default, --smoke, --seed-scale)
SIZES = {"designs": (20_000, 300, 10_000), "size": (64, 64, 256), "epochs": (1, 3, 10), "batch_size": (32, 8, 32),
         "lr": (3e-3, 1e-2, 1e-3), "widths": ((16, 32, 64), (8, 16), (64, 128, 256, 512, 1024))}
#: the seed's success criteria: metric -> (threshold, "above" or "below")
CRITERIA = {"text_iou": (0.90, "above"), "image_iou": (0.85, "above"), "color_accuracy": (0.80, "above"),
            "color_accuracy_fg": (None, None), "hierarchy_mse": (0.05, "below")}
LABELS = {"text_iou": "text IoU", "image_iou": "image IoU", "color_accuracy": "colour accuracy",
          "color_accuracy_fg": "colour accuracy, non-background", "hierarchy_mse": "hierarchy MSE"}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/design/encoder")  # --lr: 3e-3 (smoke 1e-2, seed scale 1e-3)
    add_data_args(p)
    p.add_argument("--widths", type=ints, default=None, help="U-Net widths, finest first (default 16,32,64)")
    p.add_argument("--blocks-per-level", type=int, default=1, help="residual blocks per U-Net level")
    p.add_argument("--head-depth", type=int, default=1, help="conv layers per head (1: the seed's 1x1)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps as a fraction of all steps")
    p.add_argument("--loss-weights", type=lambda s: tuple(float(v) for v in s.split(",")), default=(1.0, 0.5, 1.0),
                   help="Dice (text and image), CE (colour), MSE (hierarchy) weights (default: the seed's 1,0.5,1)")
    p.add_argument("--examples", type=int, default=4, help="held-out designs drawn in predictions.png")
    p.add_argument("--seed-scale", action="store_true", help="the seed's 256 px and widths (see the defaults)")
    args = p.parse_args(argv)
    column = 1 if args.smoke else 2 if args.seed_scale else 0
    for key, values in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, values[column])
    return args


def encoder_loss(weights: tuple[float, float, float]) -> CompositeLoss:
    """The seed's CompositeLoss on an EncoderOutput ``out`` and the true hard F ``target``."""
    dice, ce, mse = weights
    return CompositeLoss(
        text=(dice, lambda out, target: dice_loss(out.text.float(), target[:, 0:1])),
        image=(dice, lambda out, target: dice_loss(out.image.float(), target[:, 1:2])),
        color=(ce, lambda out, target: F.cross_entropy(out.color.float(), target[:, 2].long())),
        hierarchy=(mse, lambda out, target: F.mse_loss(out.hierarchy.float(), target[:, 3:4])))


def evaluate(model, data, info, precision: str, criterion: CompositeLoss | None = None) -> torch.Tensor:
    """Per-design rows of every design of ``data``, sharded over ranks: ``structure_rows`` then the loss terms."""
    model.eval()
    broadcast_buffers(model)

    def rows_fn(rows: torch.Tensor) -> torch.Tensor:
        batch = data.get_batch(rows.cpu())
        image, target = batch.image.to(info.device), batch.structure.to(info.device)
        with autocast(info.device, precision):
            out = model(image)
        pred = torch.cat([(out.text > 0).float(), (out.image > 0).float(), out.color.argmax(1, keepdim=True).float(),
                          out.hierarchy.float()], dim=1)
        scores = [structure_rows(pred, target)]
        if criterion is not None:  # per design: every term is a mean over designs of equal size
            one = [criterion(type(out)(*(o[i:i + 1] for o in out)), target[i:i + 1]) for i in range(len(rows))]
            scores.append(torch.stack([torch.stack([o.total.detach(), *o.terms.values()]) for o in one]))
        return torch.cat(scores, dim=1).float()

    return predict_rows(rows_fn, len(data), batch_size=64, device=info.device)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    device, say = info.device, main_print(info.is_main)
    t_start = time.perf_counter()

    # --- data (outside the run folder, cached: built before the folder is claimed) ---------------
    splits = open_data(data_dir(args.data, args.out, args.smoke, args.size), args.designs, args.size, args.data_seed,
                       args.workers, info.is_main)
    run = RunDir(args.out, run_config(args, ignore=("data", "workers", "examples")), resume=args.resume,
                 overwrite=args.overwrite)
    seed_everything(args.seed)
    train, val, test = splits.train, splits.val, splits.test
    say(f"designs: train {len(train)}, val {len(val)}, test {len(test)}; world {info.world_size} on {device}, "
        f"{args.precision}")

    # --- model and loss --------------------------------------------------------------------------
    kwargs = {"widths": list(args.widths), "blocks_per_level": args.blocks_per_level, "head_depth": args.head_depth}
    model = DesignEncoder(**kwargs).to(device)
    run.write_json(MODEL_FILE, {"kind": "design-encoder", "kwargs": kwargs})
    criterion = encoder_loss(args.loss_weights)
    terms = list(criterion.terms)
    say(f"encoder: UNet widths {args.widths} + 4 heads, {count_parameters(model):,} parameters")

    # --- train -----------------------------------------------------------------------------------
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is larger than the training split ({len(train)} designs)")
    total = args.epochs * steps_per_epoch
    warmup = min(int(args.warmup * total), total - 1)
    ddp = wrap_ddp(model, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = lambda s: warmup_cosine(s, total, warmup, args.lr, min_lr=0.01 * args.lr)  # noqa: E731
    stepper = Stepper(ddp, optimizer, precision=args.precision, num_batches=steps_per_epoch, clip_value=1.0,
                      schedule=schedule)
    state = {"model": model, "optimizer": optimizer, "stepper": stepper}
    ckpt = run.checkpoints("checkpoints", keep_last=1)
    resumed = run.resume_from(ckpt, state)
    log = run.metrics_log("metrics.jsonl", resumed, key="step")
    dash = Dashboard(total, every_s=15, is_main=info.is_main, desc="encoder ")
    if resumed:
        dash.write(f"resumed from {resumed['path']} (epoch {resumed['step']}, step {stepper.steps})")
    t0 = time.perf_counter()
    for epoch in range(resumed["step"] + 1 if resumed else 1, args.epochs + 1):
        order = rank_batches(len(train), per_rank, epoch, args.seed, info.rank, info.world_size)
        ddp.train()
        sums = torch.zeros(1 + len(terms), dtype=torch.float64, device=device)
        for i, rows in enumerate(order):
            batch = train.get_batch(rows)
            with stepper.micro_batch(i) as mb:
                with autocast(device, args.precision):
                    out = ddp(batch.image.to(device))
                loss = criterion(out, batch.structure.to(device))
                stepper.backward(loss.total)
            sums += torch.stack([loss.total.detach(), *loss.terms.values()]).double()
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, stepper.steps)
                dash.update(stepper.steps, epoch=epoch, loss=loss.total.detach())
        sums = all_reduce_sum(sums) / (steps_per_epoch * info.world_size)
        rows = evaluate(model, val, info, args.precision, criterion)
        val_loss = rows[:, 6:].double().mean(0)
        record = {"epoch": epoch, "opt_step": stepper.steps, "lr": schedule(stepper.steps - 1),  # the last step's
                  **{f"train_{k}": float(v) for k, v in zip(["loss", *terms], sums)},
                  **{f"val_{k}": float(v) for k, v in zip(["loss", *terms], val_loss)},
                  **{f"val_{k}": v for k, v in structure_scores(rows[:, :6]).items()},
                  "time_s": time.perf_counter() - t0}
        log.log(epoch, **record)  # before the checkpoint: a resumed log equals an uninterrupted one
        dash.write(f"epoch {epoch}/{args.epochs}: train loss {record['train_loss']:.4f}, val loss "
                   f"{record['val_loss']:.4f}, text IoU {record['val_text_iou']:.3f}, image IoU "
                   f"{record['val_image_iou']:.3f}, colour {record['val_color_accuracy']:.3f}, hierarchy MSE "
                   f"{record['val_hierarchy_mse']:.4f}")
        ckpt.save(epoch, state, metric=record["val_loss"])
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    best = ckpt.load_best({"model": model})

    # --- evaluate on held-out designs, against the empty design ----------------------------------
    scores = structure_scores(evaluate(model, test, info, args.precision)[:, :6])
    if info.is_main:
        empty = structure_scores(torch.cat([structure_rows(torch.zeros_like(b.structure), b.structure) for b in
                                            (test.get_batch(range(i, min(i + 256, len(test))))
                                             for i in range(0, len(test), 256))]))
        table = criteria_table(scores, empty, len(test))
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device), "model": kwargs,
                   "parameters": count_parameters(model), "designs": {"train": len(train), "val": len(val),
                                                                      "test": len(test)},
                   "best_epoch": best["step"] if best else None, "epochs_run": len(records),
                   "optimizer_steps": stepper.steps, "train_time_s": time.perf_counter() - t0, "test": scores,
                   "test_empty_design": empty, "criteria": {k: v for k, v in CRITERIA.items() if v[0] is not None},
                   "passed": passed(scores), "table": table, "wall_time_s": time.perf_counter() - t_start}
        plt = pyplot()
        if plt is not None:
            batch = test.get_batch(range(min(args.examples, len(test))))
            with torch.no_grad():
                pred = model.eval().structure(batch.image.to(device)).cpu()
            plot_structures(plt, batch.image, batch.structure, pred, run.file("predictions.png"))
            summary["plots"] = ["predictions.png"]
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


def passed(scores: dict[str, float]) -> dict[str, bool]:
    """Whether each seed criterion is met."""
    return {k: (scores[k] > t if side == "above" else scores[k] < t) for k, (t, side) in CRITERIA.items()
            if t is not None}


def criteria_table(scores: dict[str, float], empty: dict[str, float], designs: int) -> str:
    ok = passed(scores)
    lines = [f"encoder on {designs} held-out designs", f"{'metric':<34}{'encoder':>9}{'empty design':>14}"
             f"{'seed criterion':>16}", "-" * 73]
    for key, label in LABELS.items():
        threshold, side = CRITERIA[key]
        rule = "" if threshold is None else f"{'>' if side == 'above' else '<'} {threshold:.2f} " + (
            "met" if ok[key] else "missed")
        lines.append(f"{label:<34}{scores[key]:>9.4f}{empty[key]:>14.4f}{rule:>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
