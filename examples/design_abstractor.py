"""Design decomposition, stage 2 (Module 6): a ResNet-18 abstractor from the structure map F to metadata.

System: design decomposition (see examples/design_encoder.py for the data and stage 1). The
abstractor (examples/design/models.py) reads F, with the colour class embedded rather than fed
as a raw 0..18 float, through a blockyard resnet18 and predicts the design's goal (10 classes),
format (4), tone and its four grammar scores (alignment, contrast, whitespace, hierarchy):

    L = CE(goal) + CE(format) + MSE(tone / std) + mean_k MSE(grammar_k / std_k)

(the regression targets standardised by the training split, so each grammar dimension counts
alike). It trains on ground-truth F and is evaluated on held-out designs from ground-truth F and,
with --encoder DIR (a finished stage-1 run), from the encoder's F, hard (thresholded masks,
arg-max colour) and soft (probabilities, the differentiable path a reward uses). Goal and format
cannot be read from a design beyond the generator's own uncertainty: the table sets accuracy
against chance, the majority class and the exact Bayes ceiling (examples/design/ceiling.py), tone
MSE against its floor (the Bayes error) and the variance (predicting the mean), grammar MAE
against predicting the training mean.

    python examples/design_abstractor.py --encoder runs/design/encoder
    python examples/design_abstractor.py --smoke --out /tmp/abstractor
    torchrun --standalone --nproc_per_node=2 examples/design_abstractor.py --resume auto

Defaults: the 20,000-design 64 px dataset in OUT/../data (built if missing), 2 epochs of AdamW at
--lr 1e-3 with warmup-cosine, global batch 64, bf16 autocast (1.6x faster than fp32 for this
ResNet on a CPU with AMX). --smoke: 300 designs, 4 epochs of batch 8. --seed-scale: 256 px,
10,000 designs, 15 epochs, dropout 0.2 (the seed's).

Writes to --out: run.json, model.json and checkpoints/ (read by design/models.py's load_abstractor),
metrics.jsonl, summary.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from design.ceiling import bayes_ceiling, bayes_predict
from design.evaluate import metadata_scores
from design.models import MODEL_FILE, AbstractorOutput, DesignAbstractor, hard_structure, load_encoder
from design.stage import add_data_args, data_dir, open_data
from design.vocab import FORMATS, GOALS, GRAMMAR_NAMES

from blockyard.blocks import count_parameters
from blockyard.data import rank_batches
from blockyard.losses import CompositeLoss
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
    run_config,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    warmup_cosine,
    wrap_ddp,
)

#: flag -> (CPU default, --smoke, --seed-scale)
SIZES = {"designs": (20_000, 300, 10_000), "size": (64, 64, 256), "epochs": (2, 4, 15), "batch_size": (64, 8, 64),
         "dropout": (0.0, 0.0, 0.2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/design/abstractor", lr=1e-3, precision="bf16")
    add_data_args(p)
    p.add_argument("--encoder", default=None, help="a finished design_encoder.py run folder: also evaluate on its F")
    p.add_argument("--color-dim", type=int, default=8, help="colour-class embedding size")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the heads")
    p.add_argument("--dropout", type=float, default=None, help="dropout of the heads (default 0; --seed-scale 0.2)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps as a fraction of all steps")
    p.add_argument("--seed-scale", action="store_true", help="the seed's 256 px (see the defaults)")
    args = p.parse_args(argv)
    column = 1 if args.smoke else 2 if args.seed_scale else 0
    for key, values in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, values[column])
    return args


def abstractor_loss(model: DesignAbstractor) -> CompositeLoss:
    """CE on goal and format, MSE on tone and grammar in units of the training std (the model's buffers)."""
    def standardised(name: str):
        return lambda out, batch: ((getattr(out, name) - getattr(batch, name)) / getattr(model, f"{name}_std")
                                   ).square().mean()

    return CompositeLoss(goal=(1.0, lambda out, batch: F.cross_entropy(out.goal.float(), batch.goal)),
                         format=(1.0, lambda out, batch: F.cross_entropy(out.format.float(), batch.format)),
                         tone=(1.0, standardised("tone")), grammar=(1.0, standardised("grammar")))


class Labels(NamedTuple):
    """What the abstractor predicts, for every design of a split (read without the images)."""

    goal: torch.Tensor
    format: torch.Tensor
    tone: torch.Tensor
    grammar: torch.Tensor
    latents: torch.Tensor


def labels(data) -> Labels:
    return Labels(*(data.store.column(name) for name in Labels._fields))


def predict(model, data, info, precision: str, structure_fn=None) -> AbstractorOutput:
    """The model's outputs (float32) for every design of ``data``, sharded over ranks, on every rank.

    ``structure_fn(batch)`` gives the F the abstractor reads (default: the true F).
    """
    model.eval()
    broadcast_buffers(model)

    def rows_fn(rows: torch.Tensor) -> torch.Tensor:
        batch = data.get_batch(rows.cpu())
        f = batch.structure.to(info.device) if structure_fn is None else structure_fn(batch)
        with autocast(info.device, precision):
            out = model(f)
        return torch.cat([out.goal.float(), out.format.float(), out.tone.float()[:, None], out.grammar.float()], 1)

    rows = predict_rows(rows_fn, len(data), batch_size=128, device=info.device)
    return AbstractorOutput(*rows.split([len(GOALS), len(FORMATS), 1, len(GRAMMAR_NAMES)], dim=1)[:2],
                            rows[:, len(GOALS) + len(FORMATS)], rows[:, -len(GRAMMAR_NAMES):])


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    device, say = info.device, main_print(info.is_main)
    t_start = time.perf_counter()

    # --- data (outside the run folder, cached: built before the folder is claimed) ---------------
    splits = open_data(data_dir(args.data, args.out, args.smoke, args.size), args.designs, args.size, args.data_seed,
                       args.workers, info.is_main)
    train, val, test = splits.train, splits.val, splits.test
    encoder = load_encoder(args.encoder, device) if args.encoder else None  # fails before the folder is claimed
    run = RunDir(args.out, run_config(args, ignore=("data", "workers", "encoder")), resume=args.resume,
                 overwrite=args.overwrite)
    seed_everything(args.seed)
    say(f"designs: train {len(train)}, val {len(val)}, test {len(test)}; world {info.world_size} on {device}, "
        f"{args.precision}")
    truth = {"train": labels(train), "val": labels(val), "test": labels(test)}

    # --- model and loss --------------------------------------------------------------------------
    kwargs = {"color_dim": args.color_dim, "hidden": args.hidden, "dropout": args.dropout}
    model = DesignAbstractor(**kwargs)
    model.set_target_stats(truth["train"].tone, truth["train"].grammar)
    model = model.to(device)
    run.write_json(MODEL_FILE, {"kind": "design-abstractor", "kwargs": kwargs})
    criterion = abstractor_loss(model)
    terms = list(criterion.terms)
    say(f"abstractor: resnet18 on F (colour embedded in {args.color_dim} dims) + 4 heads, "
        f"{count_parameters(model):,} parameters")

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
    dash = Dashboard(total, every_s=15, is_main=info.is_main, desc="abstractor ")
    if resumed:
        dash.write(f"resumed from {resumed['path']} (epoch {resumed['step']}, step {stepper.steps})")
    t0 = time.perf_counter()
    for epoch in range(resumed["step"] + 1 if resumed else 1, args.epochs + 1):
        order = rank_batches(len(train), per_rank, epoch, args.seed, info.rank, info.world_size)
        ddp.train()
        sums = torch.zeros(1 + len(terms), dtype=torch.float64, device=device)
        for i, rows in enumerate(order):
            batch = train.get_batch(rows)._replace(image=None)
            batch = batch._replace(**{k: getattr(batch, k).to(device) for k in ("structure", *Labels._fields)})
            with stepper.micro_batch(i) as mb:
                with autocast(device, args.precision):
                    out = ddp(batch.structure)
                loss = criterion(out, batch)
                stepper.backward(loss.total)
            sums += torch.stack([loss.total.detach(), *loss.terms.values()]).double()
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, stepper.steps)
                dash.update(stepper.steps, epoch=epoch, loss=loss.total.detach())
        sums = all_reduce_sum(sums) / (steps_per_epoch * info.world_size)
        v = truth["val"]
        out = predict(model, val, info, args.precision)
        with torch.no_grad():
            val_loss = criterion(out, Labels(*(x.to(device) for x in v)))
        scores = metadata_scores(out, v.goal, v.format, v.tone, v.grammar)
        record = {"epoch": epoch, "opt_step": stepper.steps, "lr": schedule(stepper.steps - 1),
                  **{f"train_{k}": float(x) for k, x in zip(["loss", *terms], sums)},
                  "val_goal_accuracy": scores["goal_accuracy"], "val_format_accuracy": scores["format_accuracy"],
                  "val_tone_mse": scores["tone_mse"],
                  **{f"val_grammar_mae_{n}": x for n, x in zip(GRAMMAR_NAMES, scores["grammar_mae"])},
                  **{f"val_{k}": float(x) for k, x in zip(["loss", *terms],
                                                          [val_loss.total, *val_loss.terms.values()])},
                  "time_s": time.perf_counter() - t0}
        log.log(epoch, **record)  # before the checkpoint: a resumed log equals an uninterrupted one
        dash.write(f"epoch {epoch}/{args.epochs}: train loss {record['train_loss']:.4f}; val goal "
                   f"{scores['goal_accuracy']:.3f}, format {scores['format_accuracy']:.3f}, tone MSE "
                   f"{scores['tone_mse']:.4f}, grammar MAE " + " ".join(f"{x:.4f}" for x in scores["grammar_mae"]))
        ckpt.save(epoch, state, metric=record["val_loss"])
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    best = ckpt.load_best({"model": model})

    # --- evaluate on held-out designs: true F, the encoder's F (hard and soft), baselines ---------
    sources = {"true F": None}
    if encoder is not None:
        def encoder_f(soft: bool):
            def fn(batch):
                with torch.no_grad():
                    f = encoder.soft_structure(batch.image.to(device))
                return f if soft else hard_structure(f)
            return fn
        sources.update({"encoder F": encoder_f(False), "encoder soft F": encoder_f(True)})
    t = truth["test"]
    results = {name: metadata_scores(predict(model, test, info, args.precision, fn), t.goal, t.format, t.tone,
                                     t.grammar) for name, fn in sources.items()}
    if info.is_main:
        baselines = baseline_scores(truth["train"], t)
        table = metadata_table(results, baselines, len(test))
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device), "model": kwargs,
                   "parameters": count_parameters(model), "designs": {k: len(v.goal) for k, v in truth.items()},
                   "encoder": args.encoder, "best_epoch": best["step"] if best else None, "epochs_run": len(records),
                   "optimizer_steps": stepper.steps, "train_time_s": time.perf_counter() - t0, "test": results,
                   "baselines": baselines, "table": table, "wall_time_s": time.perf_counter() - t_start}
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


def baseline_scores(train, test) -> dict:
    """Chance, majority, exact Bayes ceiling (and the Bayes predictor on these designs), training-mean grammar MAE."""
    c = bayes_ceiling()
    bayes = bayes_predict(test.latents.numpy())
    return {"chance": {"goal_accuracy": c.goal_chance, "format_accuracy": c.format_chance},
            "majority": {"goal_accuracy": c.goal_majority, "format_accuracy": c.format_majority,
                         "tone_mse": c.tone_variance,
                         "grammar_mae": (test.grammar - train.grammar.mean(0)).abs().mean(0).tolist()},
            "bayes": {"goal_accuracy": c.goal_accuracy, "format_accuracy": c.format_accuracy, "tone_mse": c.tone_mse},
            "bayes_on_test": {"goal_accuracy": float((torch.from_numpy(bayes.goal) == test.goal).double().mean()),
                              "format_accuracy": float((torch.from_numpy(bayes.format) == test.format).double().mean()),
                              "tone_mse": float((torch.from_numpy(bayes.tone) - test.tone.double()).square().mean())}}


def metadata_table(results: dict, baselines: dict, designs: int) -> str:
    names = list(results)
    lines = [f"abstractor on {designs} held-out designs (reads: {', '.join(names)}); baselines: chance, majority "
             "class or mean, exact Bayes ceiling/floor, Bayes predictor on these designs",
             f"{'metric':<24}" + "".join(f"{n:>16}" for n in names) + f"{'chance':>9}{'maj/mean':>10}{'Bayes':>9}"
             f"{'Bayes here':>12}", "-" * (24 + 16 * len(names) + 40)]

    def cell(group: str, key: str, k: int | None = None) -> str:
        value = baselines[group].get(key)
        return "-" if value is None else f"{value[k] if k is not None else value:.4f}"

    for key, label in (("goal_accuracy", "goal accuracy"), ("format_accuracy", "format accuracy"),
                       ("tone_mse", "tone MSE")):
        lines.append(f"{label:<24}" + "".join(f"{results[n][key]:>16.4f}" for n in names) + f"{cell('chance', key):>9}"
                     f"{cell('majority', key):>10}{cell('bayes', key):>9}{cell('bayes_on_test', key):>12}")
    for k, g in enumerate(GRAMMAR_NAMES):
        lines.append(f"{'grammar MAE ' + g:<24}" + "".join(f"{results[n]['grammar_mae'][k]:>16.4f}" for n in names)
                     + f"{'-':>9}{cell('majority', 'grammar_mae', k):>10}{'-':>9}{'-':>12}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
