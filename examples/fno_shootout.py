"""FNO stability shootout: which residual block or clipping rule keeps a hybrid U-NO training?

System: the FNO / hybrid U-NO stability study. The original drew conclusions from one seed, half
the Fourier modes, a channel cap that never reached the model, a schedule that never stepped and
phase metrics on phase-free data. Here every arm (hybrid, hybrid + norm clip, hybrid + AGC, stable
zero-gamma, stable LayerScale, and a positive control built to fail) trains on the same simulated
grid-lines ptychography data for N seeds, and the run reports per arm: failures / n and the step of
each failure (time to failure), median and IQR over the successful runs of best and final validation
loss, of the test loss and of amplitude and phase SSIM, gradient-norm median / p99 / max, and
activation mean / std per block versus depth at init and at the end.

Each seed draws three objects: train, validation and test. The validation object gives the loss
curve, the best validation loss and the failure rule's input; the test object only the reported
test loss and SSIMs. The failure rule: a non-finite loss, a collapsed output (stitched amplitude
std / mean < 1e-3), a final validation loss above 3x the best, or one no lower than before the first
step (stalled: added when the positive control froze without collapsing); a run's time to failure
is the first epoch's step at which the rule fires on the run so far. The positive control
(hybrid_lr100: no clipping, 100x the learning rate) shows that the rule can fire. Phase is scored twice: stitched as
predicted, and with each patch's unobservable constant phase removed first (examples/fno/phase.py).

--schedule cosine (default) warms up and decays the lr every optimizer step; --schedule constant is
the original's regime (a flat --lr, no warmup), in which its LayerScale arm collapsed. --clip-sweep
1,5,10,20,50,100 adds the control with each global norm clip (the original's clip sweep).

That is the plan's Stage A. Stage B then trains the Stage A winner (among the plan's three arms:
lowest failure rate, then lowest median best validation loss) with more channel-doubling levels on
the same data and seeds, each level at most --max-channels wide; its runs go to OUT/stage_b/, beside
Stage A's OUT/runs/, under names that carry the depth, and get their own table. Last, the plan's
decision logic is applied to the run's own table (examples/fno/verdict.py): each fix's success
condition, and the verdict gold / silver / pivot / undecided with its reasons, printed and written to
summary.json ("verdict"). Comparison runs keep the plan's 20-epoch cap; a run with more epochs is
labelled a stress test.

A run (one arm, one seed, one depth) trains in one process, so --batch-size (the global batch) is
its batch; torchrun's processes share out the runs. A run is finished once its record
(OUT/runs/<arm>_seed<s>.json, OUT/stage_b/<arm>_levels<L>_seed<s>.json) is written (after its
weights); --resume auto keeps the finished runs and starts the others anew.

    python examples/fno_shootout.py                      # CPU default: 6 arms x 3 seeds, then Stage B
    python examples/fno_shootout.py --schedule constant --clip-sweep 1,5,10,20,50,100   # the original's regime
    python examples/fno_shootout.py --seed-scale         # the original's sizes (GPU): 64 px, hidden 32, 5 seeds
    torchrun --standalone --nproc_per_node=2 examples/fno_shootout.py   # runs shared across ranks
    python examples/fno_shootout.py --resume auto        # continue an interrupted sweep
    torchrun --standalone --nproc_per_node=4 examples/fno_shootout.py --fsdp --hidden 64   # each run on all ranks

--fsdp: every run is trained by all processes together instead (FSDP2: its FNO blocks sharded,
each process 1/world of every batch), for widths whose model and Adam state outgrow one device.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fno.arms import ARMS, PtychoNet, classify_failure, first_failure, physics_loss, resolve_arm
from fno.evaluate import activation_profile, evaluate, loss_scale, score_reconstruction
from fno.plan import arm_list, stage_b_depths
from fno.report import plot, print_clip_sweep, print_table, print_verdict, summarize
from fno.sim import make_probe, simulate_splits
from fno.verdict import plan_verdict, stage_a_winner

from blockyard.blocks import FNOBlock, StableFNOBlock, count_parameters
from blockyard.data import write_json_atomic
from blockyard.train import (
    Dashboard,
    DistInfo,
    RunDir,
    Stepper,
    add_common_args,
    all_reduce_sum,
    autocast,
    barrier,
    kill_point,
    main_print,
    run_config,
    seed_everything,
    setup_distributed,
    shard_model,
    teardown_distributed,
    warmup_cosine,
)

EPOCH_CAP = 20  # the plan: "test/comparison runs must use <= 20 epochs unless explicitly labeled as a stress test"


SEED_SCALE = dict(size=392, patch=64, stride=4, hidden=32, levels=4, modes=12, epochs=20, seeds=5)
SMOKE = dict(size=40, patch=16, stride=8, hidden=4, modes=4, levels=2, epochs=2, seeds=1, batch_size=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/fno", epochs=EPOCH_CAP, batch_size=16, lr=1e-3, fsdp=True)
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated subset of " + ", ".join(ARMS) + ", or hybrid_clip<v> (the control with norm "
                        "clip v)")
    p.add_argument("--clip-sweep", default="", metavar="V1,V2,...",
                   help="also train the control (hybrid) with each of these global norm clips (the original's sweep: "
                        "1,5,10,20,50,100); an arm already in --arms with the same clip stands for its value")
    p.add_argument("--seeds", type=int, default=3,
                   help="runs per arm; run i uses the seed (--seed + i). The original's protocol asks for 5-10")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine: warmup, then a cosine decay to 1%% of the peak lr; constant: a flat lr (the "
                        "original's regime, in which its LayerScale arm collapsed)")
    p.add_argument("--warmup", type=float, default=None,
                   help="warmup as a fraction of all steps (default 0.05 with cosine, 0 with constant)")
    p.add_argument("--loss", default="mae", choices=["mae", "poisson"])
    p.add_argument("--size", type=int, default=96, help="object size in px")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--modes", type=int, default=8)
    p.add_argument("--levels", type=int, default=3, help="Stage A's channel-doubling levels (the plan's fno_blocks)")
    p.add_argument("--blocks-per-level", type=int, default=1)
    p.add_argument("--max-channels", type=int, default=None,
                   help="cap on every level's width (default: Stage A's widest, hidden * 2**(levels-1), so the cap "
                        "leaves Stage A unchanged and Stage B adds depth, not width; the plan capped at 16x hidden)")
    p.add_argument("--stage-b-levels", default="auto",
                   help="Stage B depths: comma-separated levels, 'none', or 'auto' = the deepest the patch holds and "
                        "twice --levels (the plan's 6 and 8 for its 64 px patches and 4 levels)")
    p.add_argument("--arch-fix", default="stable_zero_gamma", choices=["stable_zero_gamma", "stable_layerscale"],
                   help="the arm the verdict judges as the plan's architectural fix (the plan: zero-gamma)")
    p.add_argument("--nphotons", type=float, default=1e9)
    p.add_argument("--seed-scale", action="store_true",
                   help="the original's sizes as defaults (flags given explicitly still win): "
                        + ", ".join(f"{k} {v}" for k, v in SEED_SCALE.items())
                        + "; a GPU job (examples/slurm/fno_seed_scale.sbatch)")
    args = p.parse_args(argv)
    if args.smoke and args.seed_scale:
        p.error("--smoke and --seed-scale: choose one")
    if args.smoke or args.seed_scale:  # preset sizes as defaults: flags given explicitly still win
        p.set_defaults(**(SMOKE if args.smoke else SEED_SCALE))
        args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 0.05 if args.schedule == "cosine" else 0.0
    try:
        args.arm_list, args.sweep = arm_list(args.arms, args.clip_sweep)
    except ValueError as err:
        p.error(str(err))
    if args.max_channels is None:
        args.max_channels = args.hidden * 2 ** (args.levels - 1)
    try:
        args.stage_b, args.stage_b_infeasible = stage_b_depths(args.stage_b_levels, args.levels, args.patch)
    except ValueError as err:
        p.error(str(err))
    return args


class Job(NamedTuple):
    """One run: ``arm`` with ``seed`` at ``levels`` channel-doubling levels, in Stage "A" or "B"."""

    stage: str
    arm: str
    seed: int
    levels: int

    def stem(self, out: Path) -> Path:
        """Where its files go: Stage A's under OUT/runs/, Stage B's beside them under OUT/stage_b/ (depth named)."""
        if self.stage == "A":
            return out / "runs" / f"{self.arm}_seed{self.seed}"
        return out / "stage_b" / f"{self.arm}_levels{self.levels}_seed{self.seed}"


def load_record(out: Path, job: Job):
    """The record of a finished run; None if the run has not finished (no record, or an unreadable one)."""
    try:
        return json.loads(job.stem(out).with_suffix(".json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def run_one(job: Job, args, out: Path, device, steps_before=0, info: DistInfo | None = None):
    """Train one job; write its weights, then its record (which marks the run finished).

    --kill-at-step K (tests) SIGKILLs this process at its K-th optimizer step of the sweep, this run's
    steps counted after the ``steps_before`` of the runs it finished: a K past one run kills mid-sweep.
    """
    arm_name, seed = job.arm, job.seed
    arm = resolve_arm(arm_name)
    gen = seed_everything(seed)
    probe = make_probe(args.patch)
    # three objects: train, validation (curve, best val, failure rule), test (reported metrics only)
    train, val, test = simulate_splits(args.size, args.patch, args.stride, probe, args.nphotons, generator=gen)
    probe, train_x = probe.to(device), train.diffraction.to(device)  # simulated on the CPU, trained anywhere
    torch.manual_seed(seed)  # the same init for every arm of this seed
    rms = float(train.diffraction.square().mean().sqrt())
    scale = loss_scale(train, args.loss)
    model = PtychoNet(arm.block, args.hidden, job.levels, args.modes, args.blocks_per_level, rms,
                      max_channels=args.max_channels).to(device)
    rank, world = (info.rank, info.world_size) if args.fsdp and info is not None else (0, 1)
    if args.fsdp:  # all ranks train this run: its FNO blocks sharded, each rank 1/world of every batch
        model = shard_model(model, modules=(FNOBlock, StableFNOBlock), precision=args.precision)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))  # ~4x faster step
    n = len(train.diffraction)
    if world > 1 and (args.batch_size < world or 0 < n % args.batch_size < world):
        raise ValueError(f"--batch-size: under --fsdp every batch needs >= {world} rows (one per process), got "
                         f"{n} patches in batches of {args.batch_size} (the last of {n % args.batch_size})")
    total = args.epochs * math.ceil(n / args.batch_size)
    warmup, peak = int(args.warmup * total), args.lr * arm.lr_scale
    floor = peak if args.schedule == "constant" else 0.01 * peak  # constant: warmup (if any), then flat
    # no non-finite skip: a diverging arm must fail; arms without clipping measure the norm (clip at inf)
    stepper = Stepper(model, opt, precision=args.precision, device=device, skip_nonfinite=False,
                      clip=arm.clip or "norm", clip_value=arm.clip_value if arm.clip else math.inf,
                      schedule=lambda s: warmup_cosine(s, total, warmup, peak, min_lr=floor))
    probe_batch = train_x[: args.batch_size]
    act_init = activation_profile(model, probe_batch)
    evaluate_on = partial(evaluate, model, probe=probe, loss=args.loss, scale=scale, precision=args.precision)
    init_val = evaluate_on(val).loss
    curve, grad_norms, step_losses, finite = [], [], [], True
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        epoch_loss = torch.zeros((), device=device)
        for j, i in enumerate(range(0, n, args.batch_size)):
            batch = train_x[order[i:i + args.batch_size]]
            x = batch[rank::world]
            with stepper.micro_batch(j) as mb:
                with autocast(device, args.precision):
                    loss = physics_loss(model(x), x, probe, args.loss, scale)
                stepper.backward(loss * (len(x) * world / len(batch)))  # ranks averaged: the batch's mean
            lr = stepper.lr
            if mb.step and stepper.step():  # False only when the fp16 scaler skips an overflow
                grad_norms.append(stepper.grad_norm)
                step_losses.append(loss.detach())  # for the step of a first non-finite loss (no host sync here)
                kill_point(args.kill_at_step, steps_before + stepper.steps)
            epoch_loss += loss.detach() * len(x)
        epoch_loss = all_reduce_sum(epoch_loss) if args.fsdp else epoch_loss
        ev = evaluate_on(val)
        curve.append(dict(step=stepper.steps, epoch=epoch + 1, train_loss=float(epoch_loss) / n, val_loss=ev.loss,
                          amp_cv=ev.amp_cv, lr=lr))
        if not (math.isfinite(curve[-1]["train_loss"]) and math.isfinite(ev.loss)):
            finite = False
            break
    norms = torch.stack(grad_norms).double().cpu() if grad_norms else torch.full((1,), math.nan)
    bad = ~(torch.stack(step_losses).double().cpu().isfinite() & norms.isfinite()) if step_losses else None
    nonfinite_step = int(bad.nonzero()[0, 0]) + 1 if bad is not None and bad.any() else None
    vals = [c["val_loss"] for c in curve]
    best = min(vals) if vals else math.nan
    failure = classify_failure(finite, best, vals[-1] if vals else math.nan, curve[-1]["amp_cv"] if curve else 0.0,
                               init_val)
    first = first_failure(curve, nonfinite_step, init_val) if failure else None  # time to failure, failed runs only
    tested = evaluate_on(test)  # the final model on the test object: reported, never used to select or judge
    metrics, images = score_reconstruction(tested, test) if finite else ({}, None)
    record = {
        "stage": job.stage, "arm": arm_name, "seed": seed, "levels": job.levels, "failure": failure,
        "failure_step": first[0] if first else None, "first_failure": first[1] if first else None,
        "params": count_parameters(model), "init_val": init_val, "schedule": args.schedule, "peak_lr": peak,
        "best_val": best, "final_val": vals[-1] if vals else math.nan, "test_loss": tested.loss, "curve": curve,
        **metrics,
        "grad_norm": {"median": float(norms.median()), "p99": float(norms.quantile(0.99)),
                      "max": float(norms.max()), "steps": len(grad_norms)},
        "activations_init": act_init, "activations_end": activation_profile(model, probe_batch) if finite else {},
        "stepper": stepper.state_dict(), "train_s": time.perf_counter() - start,  # stepper: steps, skips, fp16 scale
    }
    # weights first (pickle-free); the record, written last and atomically, marks the run finished
    stem = job.stem(out)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}  # --fsdp: the shards gathered, on every rank
    if rank == 0:  # under --fsdp every rank trained this run; one writes it
        save_file(weights, f"{stem}_model.safetensors")
        if images is not None:
            save_file({k: v.float().contiguous() for k, v in images.items()}, f"{stem}_recon.safetensors")
        write_json_atomic(f"{stem}.json", record)  # by the rank that trained it (RunDir writes on rank 0 only)
    return record


def sweep(stage: str, jobs: list[Job], args, run: RunDir, info, steps: int) -> tuple[list[dict], int]:
    """Train the unfinished ``jobs``, shared out over the ranks; every job's record, on every rank."""
    todo = [j for j in jobs if not run.resumed or load_record(run.path, j) is None]
    barrier()  # every rank has listed the finished runs before any rank adds one
    mine = todo if args.fsdp else todo[info.rank::info.world_size]
    main_print(info.is_main)(f"Stage {stage}: {len(jobs)} runs ({len(jobs) - len(todo)} already done), "
                             f"{info.world_size} process(es); out: {run.path}")
    with Dashboard(total=max(1, len(mine)), every_s=0 if args.smoke else 30, is_main=info.is_main) as dash:
        for k, job in enumerate(mine):
            r = run_one(job, args, run.path, info.device, steps, info=info)
            steps += r["stepper"]["steps"]
            dash.update(k + 1, arm=job.arm, levels=job.levels, seed=job.seed, best_val=r["best_val"],
                        failure=r["failure"] or "none")
    barrier()
    return [load_record(run.path, j) for j in jobs], steps


def main(argv=None):
    args = parse_args(argv)
    info = setup_distributed()
    derived = ("stage_b", "stage_b_infeasible", "arm_list", "sweep")  # functions of the flags
    run = RunDir(args.out, run_config(args, ignore=derived), resume=args.resume, overwrite=args.overwrite)
    say = main_print(info.is_main)
    for folder in ("runs", "stage_b"):  # on every rank: each writes the runs it trains
        run.file(folder).mkdir(exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))
    stress = args.epochs > EPOCH_CAP
    kind = f"STRESS TEST ({args.epochs} epochs > the plan's {EPOCH_CAP}-epoch cap)" if stress else "comparison run"
    say(f"FNO shootout, {kind}: {len(args.arm_list)} arms x {args.seeds} seeds at {args.levels} levels, "
        f"widths capped at {args.max_channels}, {args.schedule} lr schedule")

    # --- Stage A: every arm (the clip sweep's included), every seed ---------------------------------
    arm_names = args.arm_list
    seeds = [args.seed + i for i in range(args.seeds)]
    records, steps = sweep("A", [Job("A", a, s, args.levels) for s in seeds for a in arm_names], args, run, info, 0)
    rows = summarize(records, arm_names)

    # --- Stage B: the Stage A winner at more channel-doubling levels, same data and seeds --------------
    plan_arms = ("hybrid", args.arch_fix, "hybrid_agc")
    winner = stage_a_winner(rows, plan_arms)
    depths = args.stage_b if winner else []
    if winner is None:
        say(f"Stage B: not run, --arms holds none of the plan's arms {plan_arms}")
    for depth, why in args.stage_b_infeasible.items():
        say(f"Stage B at {depth} levels: not run, {why}")
    deep, steps = sweep("B", [Job("B", winner, s, d) for d in depths for s in seeds], args, run, info, steps)
    deep_rows = {d: summarize([r for r in deep if r["levels"] == d], [winner])[winner] for d in depths}

    # --- the plan's verdict and the report --------------------------------------------------------------
    verdict = plan_verdict(rows, deep_rows, stage_b_arm=winner, arch=args.arch_fix)
    if info.is_main:
        with run.metrics_log("metrics.jsonl") as log:  # rebuilt from the records on every (resumed) run
            for r in records + deep:
                for c in r["curve"]:
                    log.log(c["step"], stage=r["stage"], arm=r["arm"], levels=r["levels"], seed=r["seed"],
                            **{k: v for k, v in c.items() if k != "step"})
        run.write_json("summary.json", {
            "run_kind": "stress test" if stress else "comparison", "epochs": args.epochs, "schedule": args.schedule,
            "arms": {a: resolve_arm(a).description for a in arm_names}, "table": rows,
            "clip_sweep": {f"{v:g}": arm for v, arm in args.sweep.items()},
            "params": {r["arm"]: r["params"] for r in records},
            "stage_b": {"arm": winner, "levels": deep_rows, "params": {r["levels"]: r["params"] for r in deep},
                        "not_run": args.stage_b_infeasible},
            "verdict": {**verdict._asdict(), "checks": [c._asdict() for c in verdict.checks]}})
        print_table(rows)
        if args.sweep:
            print_clip_sweep(rows, args.sweep)
        if deep_rows:
            print(f"\nStage B: {winner} at more levels (widths capped at {args.max_channels}), beside its Stage A row")
            print_table({f"{winner} @{args.levels} levels (A)": rows[winner],
                         **{f"{winner} @{d} levels": row for d, row in deep_rows.items()}}, activations=False)
        print_verdict(verdict)
        if stress:
            print(f"(a stress test: {args.epochs} epochs exceed the plan's {EPOCH_CAP}-epoch cap for comparison runs)")
        plot(records, rows, run)
        print(f"wrote {run.path / 'summary.json'}, {run.path / 'metrics.jsonl'} and PNG plots")
    run.finish()
    teardown_distributed()


if __name__ == "__main__":
    main()
