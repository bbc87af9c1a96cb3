"""FusionNet v2: learn which local rewiring op lowers the zone crossings of a Hamiltonian path.

System: FusionNet v2. A grid is split into zones and covered by one Hamiltonian path; 12 local
ops rewire the path inside a 3x3 (or 3x2, 2x3) window. A simulated-annealing teacher records op
sequences that lower the number of path edges between zones; FusionNet (a GroupNorm U-Net with
history-FiLM, bottleneck attention, K=4 winner-takes-all position heatmaps and a 12-way action
map) learns to propose an op that lowers the crossings. This script builds the dataset if it is
missing, trains with DDP, validates every epoch against honest baselines (uniform and
train-frequency picks among the legal anchors) and against what the data allows (how often the
top-1 / top-5 proposals improve, the teacher-pick ceiling, per zone pattern), judges the seed's
staged-validation criteria, and runs the inference evaluation (model-guided search vs random and
annealing baselines on held-out trajectories).

Targets (``--targets``): ``set`` trains position and action on every improving op of the state
(stored with each sample), weighted by its crossing reduction; ``teacher`` on the teacher's one
pick, uniform among them, whose top-1 no model can predict above ``E[1/#improving]``.
``--perturb P`` moves a training state by ``--perturb-steps`` random applicable ops with
probability P and relabels it exactly (DAgger-lite; deterministic in (seed, epoch, index)).

    python examples/fusion_ddp.py                                          # one process
    torchrun --standalone --nproc_per_node=2 examples/fusion_ddp.py        # default CPU run
    torchrun --standalone --nproc_per_node=2 examples/fusion_ddp.py --resume auto
    torchrun --standalone --nproc_per_node=2 examples/fusion_ddp.py --fsdp # FSDP2, sharded checkpoints
    python examples/fusion_ddp.py --eval runs/fusion/checkpoints           # inference table only
    python examples/fusion_ddp.py --trajectories final_dataset.jsonl --test-trajectories test.jsonl

Device defaults: --epochs 200 on CUDA, 4 on the CPU, 2 with --smoke; --batch-size (global,
summed over the processes) 64 per process on CUDA, 32 on the CPU, 16 with --smoke, times the
number of processes; --widths 48,96,192,192 (the seed's) on CUDA, 16,32,64,64 on the CPU;
--levels (2x2 poolings) 4 on CUDA (the seed's: bottleneck 8x8 on a 128 canvas), 3 on the CPU.

Data: the teacher's trajectories (built on first use), or --trajectories FILE.jsonl, the seed's
trajectory format (one SA or GA run a line; see examples/fusion/trajectories.py), imported the
same way. --test-trajectories FILE.jsonl evaluates on a held-out file of that format instead of
the test split; setting 3 of the inference table is then the seed's own inference table.

Writes to --out: run.json, metrics.jsonl (one record per epoch), checkpoints/, summary.json,
curves.png, heatmaps.png; the dataset is cached in OUT/data unless --data names one.

--eval CHECKPOINT (a checkpoints folder, for its best by validation loss, or one step_* in it)
runs only the inference evaluation: the model comes from the checkpoint's run.json (else from
the flags), the dataset from that run's folder (or --data). It reads the training run's folder
and never writes there (it may still be training): eval.json goes to a run folder of its own,
--out if given, else RUN/eval (a used one is refused unless --overwrite).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fusion import build_data, infer
from fusion.batches import FusionSamples, collate, model_inputs
from fusion.metrics import ValidationMetrics, frequency_prior, pattern_table, staged_criteria
from fusion.model import FusionNet
from fusion.plots import plot_curves, plot_heatmaps
from fusion.trajectories import format_counts, load_trajectories

from blockyard.blocks import DecoderLevel, EncoderLevel, count_parameters
from blockyard.data import BucketBatchSampler, GroupedStore
from blockyard.losses import (
    CompositeLoss,
    neighborhood_cross_entropy,
    set_cross_entropy,
    wta_heatmap_loss,
    wta_set_heatmap_loss,
)
from blockyard.train import EMA, Dashboard, EarlyStopping, RunDir, Stepper, autocast, warmup_cosine
from blockyard.train.cli import add_common_args, kill_point, main_print, per_rank_batch, run_config
from blockyard.train.distributed import all_reduce_sum, barrier, setup_distributed, teardown_distributed, wrap_ddp
from blockyard.train.sharding import gathered, shard_model
from blockyard.train.sweeps import seed_everything

OFF_STEPS = 4  # random ops moving each validation state off the teacher's trajectory (off_* metrics)
OFF_KEYS = ("improving_top1", "improving_top5", "gain_top1", "ceiling_top1", "improving_ops")
# may change between a run and its resume without changing its results
NOT_CONFIG = ("data", "workers", "loader_workers", "checkpoint_every", "eval")


def anneal_guide(args) -> infer.AnnealGuide:
    """Setting 2's model guide: ``--guide-explore`` and ``--guide-temperature``, the rest ``AnnealGuide``'s defaults."""
    return infer.AnnealGuide(explore_prob=args.guide_explore, model_temperature=args.guide_temperature)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/fusion", lr=4e-4, precision="bf16", fsdp=True)
    p.set_defaults(out=None)  # --eval's default differs (see above)
    p.add_argument("--data", default=None, help="dataset directory (default OUT/data; built if missing)")
    p.add_argument("--trajectories", default=None, metavar="FILE.jsonl",
                   help="build the dataset from this trajectory file (the seed's JSONL format), not the teacher")
    p.add_argument("--test-trajectories", default=None, metavar="FILE.jsonl",
                   help="held-out trajectories (the seed's JSONL format) for the inference table, not the test split")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=warmup_arg, default=0.05,
                   help="warmup: a fraction of all optimizer steps (0.05) or a step count (the seed's 2000)")
    p.add_argument("--eval", default=None, metavar="CHECKPOINT", help="evaluate a checkpoint: inference table only")
    p.add_argument("--workers", type=int, default=None, help="dataset build processes (default: the CPUs we may use)")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    p.add_argument("--patience", type=int, default=40, help="early stopping on val loss")
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step (each of --batch-size samples)")
    p.add_argument("--widths", default=None, help="U-Net widths, e.g. 48,96,192,192 (seed); CPU default 16,32,64,64")
    p.add_argument("--levels", type=int, default=None,
                   help="2x2 poolings: len(widths) (the seed's, bottleneck 8x8 on 128x128; CUDA default) or "
                        "len(widths) - 1 (CPU default)")
    p.add_argument("--max-grid", type=int, default=128, help="largest grid side the model accepts (history y/x tables)")
    p.add_argument("--hypotheses", type=int, default=4)
    p.add_argument("--rnn-hidden", type=int, default=None, help="history GRU width (default 64, 192 with seed widths)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights used for validation (0 = off)")
    p.add_argument("--channels-last", type=int, default=0, choices=[0, 1],
                   help="channels_last model and inputs (slower on the CPU here: benchmarks/fusion_train.py)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="keep every N-th epoch's checkpoint")
    p.add_argument("--n-per-pattern", type=int, default=None, help="inference grids per zone pattern")
    guide = infer.AnnealGuide()
    p.add_argument("--guide-explore", type=float, default=guide.explore_prob,
                   help=f"setting 2: share of uniform proposals in the model-guided annealer (default "
                        f"{guide.explore_prob:g}; examples/fusion/guide_sweep.py compares guides on validation "
                        f"trajectories)")
    p.add_argument("--guide-temperature", type=float, default=guide.model_temperature,
                   help=f"setting 2: temperature on the model's proposal distribution (default "
                        f"{guide.model_temperature:g})")
    p.add_argument("--targets", choices=("set", "teacher"), default="set",
                   help="'set': every improving op of the state, weighted by its crossing reduction (WTA over the "
                        "position hypotheses kept); 'teacher': the teacher's one pick (Gaussian WTA heatmap + "
                        "neighbourhood action CE)")
    p.add_argument("--perturb", type=float, default=0.5,
                   help="probability that a training state is moved by --perturb-steps random applicable ops and "
                        "relabelled exactly (DAgger-lite; 0 = off)")
    p.add_argument("--perturb-steps", type=int, default=2, help="random ops per perturbed state")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        defaults = {"epochs": 2, "widths": "8,8,8,8", "levels": 3, "rnn_hidden": 16, "n_per_pattern": 2}
    else:
        defaults = {"epochs": 200 if cuda else 4, "widths": "48,96,192,192" if cuda else "16,32,64,64",
                    "levels": 4 if cuda else 3, "rnn_hidden": 192 if cuda else 64,
                    "n_per_pattern": 25 if cuda else 16}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.loader_workers is None:
        args.loader_workers = 4 if cuda else 0
    args.widths = tuple(int(w) for w in str(args.widths).split(","))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    device, is_main = info.device, info.is_main
    if args.batch_size is None:  # each process keeps its batch: 64 on CUDA, 32 on the CPU, 16 with --smoke
        args.batch_size = (16 if args.smoke else 64 if device.type == "cuda" else 32) * info.world_size
    batch_size = per_rank_batch(args.batch_size, info.world_size)
    seed_everything(args.seed + info.rank)  # dropout differs per rank; DDP broadcasts rank 0's init
    say = main_print(is_main)
    if args.eval is not None:
        evaluate_checkpoint(args, info)
        teardown_distributed()
        return
    args.out = args.out or "runs/fusion"
    run = RunDir(args.out, run_config(args, ignore=NOT_CONFIG), resume=args.resume, overwrite=args.overwrite)

    # --- data: rank 0 builds the dataset once (and reads a held-out file), the others wait -------
    data_dir = Path(args.data) if args.data else run.path / "data"
    test_records = None
    if is_main:
        t0 = time.perf_counter()
        build_data.ensure_dataset(data_dir, smoke=args.smoke, workers=args.workers, trajectories=args.trajectories)
        say(f"dataset: {data_dir} ready in {time.perf_counter() - t0:.1f} s")
        test_records = read_test_file(args.test_trajectories, say)  # before training: a bad line stops us now
    barrier()
    train_store = GroupedStore(data_dir / "train", verify=is_main)
    val_store = GroupedStore(data_dir / "val", verify=is_main)
    largest = max(max(g.key) for g in (*train_store.groups, *val_store.groups))
    if largest > args.max_grid:
        raise ValueError(f"--max-grid: expected >= the dataset's largest grid side {largest}, got {args.max_grid}")
    train_set = FusionSamples(train_store, augment=True, seed=args.seed, perturb=args.perturb,
                              perturb_steps=args.perturb_steps)
    val_set = FusionSamples(val_store)
    train_sampler = BucketBatchSampler(train_set, batch_size, shuffle=True, seed=args.seed, drop_last=True,
                                       rank=info.rank, world_size=info.world_size)
    # Validation: every sample exactly once over all ranks (no padding batches); ranks may run
    # different numbers of batches, so validation uses the unwrapped model and no collectives.
    val_batches = list(BucketBatchSampler(val_set, 2 * batch_size, shuffle=False))[info.rank::info.world_size]
    loader_kw = {"num_workers": args.loader_workers, "collate_fn": collate, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_set, batch_sampler=train_sampler, **loader_kw)
    val_loader = DataLoader(val_set, batch_sampler=val_batches, **loader_kw)
    # off the teacher's trajectories: the same states, each moved by OFF_STEPS random applicable ops (one fixed
    # draw) and relabelled exactly, as a search leaves the teacher's states (what --perturb trains for)
    off_set = FusionSamples(val_store, seed=args.seed, perturb=1.0, perturb_steps=OFF_STEPS)
    off_loader = DataLoader(off_set, batch_sampler=val_batches, **loader_kw)
    prior = frequency_prior(train_store)
    say(f"train {len(train_store)} samples {train_store!r}\nval {len(val_store)} samples; world {info.world_size} "
        f"on {device}, {args.precision}, {len(train_loader)} batches of {batch_size} per rank per epoch")

    # --- model: FusionNet from blockyard blocks (examples/fusion/model.py) -------------------
    model_config = model_config_of(args)
    net = build_model(model_config, device, bool(args.channels_last))
    ema = EMA(net, decay=args.ema) if args.ema > 0 else None  # before sharding: FSDP2 modules cannot be copied
    model = (shard_model(net, modules=(EncoderLevel, DecoderLevel), precision=args.precision, ema=ema) if args.fsdp
             else wrap_ddp(net, info))
    say(f"FusionNet {model_config}: {count_parameters(net):,} parameters, channels_last={bool(args.channels_last)}")

    # --- loss: 5 x WTA heatmap + action CE + 0.5 x hypothesis diversity, on the set or the pick --
    if args.targets == "set":  # every improving op, weighted by its crossing reduction
        def position_loss(out, batch, inputs):
            return wta_set_heatmap_loss(out.position, inputs.ops.gain.sum(1), inputs.mask)

        def action_loss(out, batch, inputs):
            return set_cross_entropy(out.action, inputs.ops.gain, label_smoothing=0.1)
    else:  # the teacher's pick: a Gaussian around it, its action at it and (weaker) at its neighbours
        def position_loss(out, batch, inputs):
            return wta_heatmap_loss(out.position, inputs.centers, inputs.mask, sigma=2.0)

        def action_loss(out, batch, inputs):
            return neighborhood_cross_entropy(out.action, inputs.centers, batch.target[:, 2], neighbor_weight=0.3,
                                              label_smoothing=0.2, center_label_smoothing=0.1, mask=inputs.mask)
    criterion = CompositeLoss(
        pos=(5.0, lambda out, batch, inputs, wta: wta.loss),
        act=(1.0, lambda out, batch, inputs, wta: action_loss(out, batch, inputs)),
        div=(0.5, lambda out, batch, inputs, wta: wta.diversity),
    )

    def forward(m, batch):
        inputs = model_inputs(batch, channels_last=bool(args.channels_last))
        with autocast(device, args.precision):
            out = m(inputs.x, batch.history, batch.history_len, batch.initial_crossings)
        wta = position_loss(out, batch, inputs)  # float32 inside
        return out, inputs, criterion(out, batch, inputs, wta)

    # --- optimizer step (accumulation, scaler, non-finite skip, clip 1.0, warmup + cosine per step, EMA)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * math.ceil(len(train_loader) / args.accum)
    warmup = warmup_steps(args.warmup, total_steps)
    stepper = Stepper(model, optimizer, precision=args.precision, accumulate=args.accum, num_batches=len(train_loader),
                      clip_value=1.0, ema=ema,
                      schedule=lambda s: warmup_cosine(s, total_steps, warmup, args.lr, min_lr=0.01 * args.lr))
    stopper = EarlyStopping(args.patience)
    ckpt = run.checkpoints(every=args.checkpoint_every, keep_last=1, sharded=args.fsdp)
    state = {"model": model, "optimizer": optimizer, "stepper": stepper, "stopper": stopper,
             **({"ema": ema} if ema is not None else {})}
    resumed = run.resume_from(ckpt, state)
    start_epoch = 1 if resumed is None else resumed["epoch"] + 1
    if resumed is not None:
        say(f"resumed from {resumed['path']} (epoch {resumed['epoch']}, step {stepper.steps})")
    log = run.metrics_log("metrics.jsonl", resumed)

    # --- train ---------------------------------------------------------------------------------
    run_start = time.perf_counter()
    dash = Dashboard(total_steps, every_s=15, is_main=is_main, desc="train ")
    for epoch in range(start_epoch, args.epochs + 1):
        if stopper.stopped:
            break
        epoch_start = time.perf_counter()
        train_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # samples, loss, pos, act, perturbed
        for i, batch in enumerate(train_loader):
            batch = batch.to(device)
            with stepper.micro_batch(i) as mb:
                _, _, loss = forward(model, batch)
                stepper.backward(loss.total)
            n = batch.target.shape[0]
            sums += torch.stack([torch.tensor(float(n), device=device), n * loss.total.detach(),
                                 n * loss.terms["pos"], n * loss.terms["act"],
                                 batch.perturbed.sum().to(loss.total.dtype)]).double()
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, stepper.steps)
                dash.update(stepper.steps, epoch=epoch, loss=loss.total.detach(), lr=stepper.lr)
        train = all_reduce_sum(sums).tolist()
        with gathered(ema.module if ema is not None else net) as eval_model:  # FSDP2: whole weights, no collectives
            val = validate(eval_model, val_loader, forward, args.hypotheses, prior, device)
            off = validate(eval_model, off_loader, forward, args.hypotheses, prior, device)
        val |= {f"off_{k}": off[k] for k in OFF_KEYS}
        record = {"epoch": epoch, "opt_step": stepper.steps, "lr": stepper.lr, "train_loss": train[1] / train[0],
                  "train_pos": train[2] / train[0], "train_act": train[3] / train[0],
                  "train_perturbed": train[4] / train[0], **val,
                  "skipped_steps": stepper.skipped, "epoch_time_s": time.perf_counter() - epoch_start}
        log.log(epoch, **record)  # before the checkpoint, so a resumed log equals an uninterrupted one
        dash.write(f"epoch {epoch}/{args.epochs}: train {record['train_loss']:.4f} val {val['loss']:.4f} | "
                   f"improving top-1 {val['improving_top1']:.1%} top-5 {val['improving_top5']:.1%} gain "
                   f"{val['gain_top1']:.2f} (off-trajectory {val['off_improving_top1']:.1%} "
                   f"{val['off_improving_top5']:.1%} {val['off_gain_top1']:.2f}) | pos top-1 {val['pos_acc_top1']:.1%} "
                   f"({val['pos_top1_of_ceiling']:.0%} of the ceiling {val['ceiling_top1']:.1%}) top-5 "
                   f"{val['pos_acc_top5']:.1%} oracle "
                   f"{val['oracle_acc_top1']:.1%} | act {val['act_acc_at_gt']:.1%} | baseline freq "
                   f"{val['baseline_freq_top1']:.1%} uniform {val['baseline_uniform_top1']:.1%} | "
                   f"{record['epoch_time_s']:.0f} s")
        stopper.step(val["loss"])
        ckpt.save(epoch, {**state, "epoch": epoch}, metric=val["loss"])
    dash.close()
    train_time = time.perf_counter() - run_start

    # --- report: criteria, inference with the best checkpoint, summary, plots ------------------
    records = log.read() if is_main else []
    log.close()
    if is_main:
        if args.fsdp:  # the main process evaluates alone: the best checkpoint's shards, whole, in a plain model
            net = build_model(model_config, device, bool(args.channels_last))
            ema = EMA(net, decay=args.ema) if ema is not None else None
        weights = {"model": net, **({"ema": ema} if ema else {})}
        best = ckpt.load_best(weights) or ckpt.load_latest(weights)  # the latest when no val loss was finite
        best_record = next(r for r in records if r["epoch"] == best["epoch"])
        eval_net = (ema.module if ema is not None else net).eval()
        t0 = time.perf_counter()
        inference = infer.run_evaluation(eval_net, data_dir, n_per_pattern=args.n_per_pattern, seed=args.seed,
                                         device=str(device), smoke=args.smoke, test_records=test_records,
                                         guide=anneal_guide(args))
        inference_time = time.perf_counter() - t0
        table = infer.format_table(inference)
        criteria = staged_criteria(records, inference, skipped_steps=records[-1]["skipped_steps"])
        last = records[-1]
        print("\n" + table)
        print(f"\nvalidation (epoch {last['epoch']}, {last['n']} samples): position top-1 {last['pos_acc_top1']:.1%} "
              f"(baselines: train-frequency {last['baseline_freq_top1']:.1%}, uniform legal "
              f"{last['baseline_uniform_top1']:.1%}), top-5 {last['pos_acc_top5']:.1%} (frequency "
              f"{last['baseline_freq_top5']:.1%}), oracle top-1 {last['oracle_acc_top1']:.1%}, action at target "
              f"{last['act_acc_at_gt']:.1%} (most frequent {last['baseline_act_acc']:.1%}); best epoch "
              f"{best_record['epoch']} (val loss {best_record['loss']:.4f})")
        validation_table = pattern_table(last)
        print(f"\nproposals against every state's improving ops (epoch {last['epoch']}, targets {args.targets}, "
              f"perturb {args.perturb} x {args.perturb_steps}):\n{validation_table}\noff the teacher's trajectories "
              f"(each state moved by {OFF_STEPS} random ops, relabelled): improving top-1 "
              f"{last['off_improving_top1']:.1%}, "
              f"top-5 {last['off_improving_top5']:.1%}, gain top-1 {last['off_gain_top1']:.3f} "
              f"({last['off_improving_ops']:.2f} improving ops per state)")
        print("\nstaged validation (seed's criteria, judged on this run):")
        for c in criteria:
            print(f"  stage {c['stage']} [{c['result']:>4}] {c['rule']}: {c['measured']}")
        search_checks = infer.search_criteria(records, inference)
        print("\nstaged validation restated (setting 2, from the initial paths; against the ceiling and the bound):")
        for c in search_checks:
            print(f"  stage {c['stage']} [{c['result']:>4}] {c['rule']}: {c['measured']}")
        plots = [plot_curves(records, run.file("curves.png"))]
        heat_batch = val_set.__getitems__(next(iter(BucketBatchSampler(val_set, 4, seed=args.seed)))).to(device)
        plots.append(plot_heatmaps(eval_net, heat_batch, run.file("heatmaps.png")))
        summary = {"world_size": info.world_size, "per_rank_batch": batch_size, "device": str(device),
                   "parameters": count_parameters(net), "dataset": str(data_dir), "train_samples": len(train_store),
                   "val_samples": len(val_store), "final": last, "best_epoch": best_record["epoch"],
                   "best": best_record, "validation_table": validation_table, "criteria": criteria,
                   "inference": inference, "inference_table": table,
                   "train_time_s": train_time, "inference_time_s": inference_time,
                   "plots": [str(p) for p in plots if p is not None], "criteria_setting2": search_checks}
        print(f"\nwrote {run.write_json('summary.json', summary)} (train {train_time:.0f} s, inference "
              f"{inference_time:.0f} s)")
    run.finish()
    teardown_distributed()


@torch.no_grad()
def validate(net, loader, forward, hypotheses, prior, device) -> dict[str, float]:
    """Loss and accuracies over the validation split, summed over every rank's shard."""
    net.eval()
    metrics = ValidationMetrics(hypotheses, prior, device)
    for batch in loader:
        batch = batch.to(device)
        out, inputs, loss = forward(net, batch)
        metrics.update(out, batch, inputs, loss)
    return metrics.compute()


def warmup_arg(text: str) -> int | float:
    """``--warmup``: an integer literal >= 1 is a step count, a decimal in ``[0, 1]`` a fraction of all steps."""
    try:
        value = int(text)
    except ValueError:
        value = float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or a step count, got {text!r}") from None
        return value
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or a step count >= 0, got {text!r}")
    return value


def warmup_steps(warmup: int | float, total_steps: int) -> int:
    """Warmup optimizer steps: a step count as given, a fraction of ``total_steps``; at most ``total_steps - 1``."""
    return min(warmup if isinstance(warmup, int) else int(warmup * total_steps), total_steps - 1)


def read_test_file(path: str | None, say) -> list[dict] | None:
    """``--test-trajectories``: the file's usable records, cleaned as for training (None without one)."""
    if path is None:
        return None
    records, counts = load_trajectories(path)
    say(f"test trajectories {path}: {format_counts(counts)}")
    return records


def model_config_of(args) -> dict:
    return {"widths": args.widths, "levels": args.levels, "hypotheses": args.hypotheses,
            "rnn_hidden": args.rnn_hidden, "max_grid": args.max_grid}


def build_model(config: dict, device: torch.device, channels_last: bool) -> FusionNet:
    net = FusionNet(**{**config, "widths": tuple(config["widths"])})
    return net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def evaluate_checkpoint(args, info) -> None:
    """``--eval CHECKPOINT``: the inference table of one checkpoint, in ``eval.json`` of a run folder of its own."""
    checkpoint = Path(args.eval)
    run_folder = (checkpoint.parent if (checkpoint / "manifest.json").exists() else checkpoint).parent
    out = Path(args.out) if args.out else run_folder / "eval"
    if out.resolve() == run_folder.resolve():
        raise ValueError(f"--out: expected a folder of the evaluation's own (default {run_folder / 'eval'}), got "
                         f"{out}, the run folder of the checkpoint it evaluates")
    config = infer.saved_model_config(checkpoint) or model_config_of(args)
    net = build_model(config, info.device, bool(args.channels_last))
    loaded = infer.load_checkpoint(checkpoint, net)  # reads only: the training run may still be writing there
    run = RunDir(out, {**run_config(args, ignore=NOT_CONFIG), "eval": str(checkpoint.resolve()), "model": config},
                 resume=args.resume, overwrite=args.overwrite)
    if info.is_main:
        data_dir = Path(args.data) if args.data else run_folder / "data"
        results = infer.run_evaluation(net.eval(), data_dir, n_per_pattern=args.n_per_pattern, seed=args.seed,
                                       device=str(info.device), smoke=args.smoke,
                                       test_records=read_test_file(args.test_trajectories, print),
                                       guide=anneal_guide(args))
        table = infer.format_table(results)
        print(f"checkpoint {loaded['path']} (epoch {loaded.get('epoch')})\n{table}")
        run.write_json("eval.json", {"checkpoint": loaded["path"], "epoch": loaded.get("epoch"), "model": config,
                                     "inference": results, "inference_table": table})
    run.finish()


if __name__ == "__main__":
    main()
