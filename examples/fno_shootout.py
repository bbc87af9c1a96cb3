"""FNO stability shootout: which residual block or clipping rule keeps a hybrid U-NO training?

System: the FNO / hybrid U-NO stability study. The original drew conclusions from one seed, half
the Fourier modes, a channel cap that never reached the model, a schedule that never stepped and
phase metrics on phase-free data. Here every arm (hybrid, hybrid + norm clip, hybrid + AGC, stable
zero-gamma, stable LayerScale) trains on the same simulated grid-lines ptychography data for N
seeds, with a warmup + cosine schedule that steps every optimizer step, and the run reports per
arm: failures / n, median and IQR over the successful runs of best and final validation loss and
of amplitude and phase SSIM, gradient-norm median / p99 / max, and activation mean / std per block
versus depth at init and at the end.

That is the plan's Stage A. Stage B then trains the Stage A winner (among the plan's three arms:
lowest failure rate, then lowest median best validation loss) with more channel-doubling levels on
the same data and seeds, each level at most --max-channels wide; its runs go to OUT/stage_b/, beside
Stage A's OUT/runs/, under names that carry the depth. Last, the plan's decision logic is applied
to the run's own table (examples/fno/verdict.py): each fix's success condition, and the verdict
gold / silver / pivot / undecided with its reasons, printed and written to summary.json
("verdict"). Comparison runs keep the plan's 20-epoch cap; a run with more epochs is labelled a
stress test.

A run (one arm, one seed, one depth) trains in one process, so --batch-size (the global batch) is
its batch; torchrun's processes share out the runs. A run is finished once its record
(OUT/runs/<arm>_seed<s>.json, OUT/stage_b/<arm>_levels<L>_seed<s>.json) is written (after its
weights); --resume auto keeps the finished runs and starts the others anew.

    python examples/fno_shootout.py                      # CPU default: 5 arms x 3 seeds, then Stage B
    python examples/fno_shootout.py --patch 64 --levels 4 --stage-b-levels 6,8   # the plan's geometry
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
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fno.arms import ARMS, PtychoNet, classify_failure, deepest_levels, physics_loss, reconstruction_metrics
from fno.report import plot, print_table, print_verdict, summarize
from fno.sim import make_probe, simulate, stitch
from fno.verdict import plan_verdict, stage_a_winner

from blockyard.blocks import FNOBlock, StableFNOBlock, count_parameters
from blockyard.data import write_json_atomic
from blockyard.train import (
    ActivationMonitor,
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/fno", epochs=EPOCH_CAP, batch_size=16, lr=1e-3, fsdp=True)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    p.add_argument("--seeds", type=int, default=3, help="runs per arm; run i uses the seed (--seed + i)")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of all steps")
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
    args = p.parse_args(argv)
    if args.smoke:  # tiny sizes as defaults: flags given explicitly still win
        p.set_defaults(size=40, patch=16, stride=8, hidden=4, modes=4, levels=2, epochs=2, seeds=1, batch_size=4)
        args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    if args.max_channels is None:
        args.max_channels = args.hidden * 2 ** (args.levels - 1)
    try:
        args.stage_b, args.stage_b_infeasible = stage_b_depths(args.stage_b_levels, args.levels, args.patch)
    except ValueError as err:
        p.error(str(err))
    return args


def stage_b_depths(spec: str, levels: int, patch: int) -> tuple[list[int], dict[int, str]]:
    """Stage B's depths that ``patch`` holds, and the others with the reason (never silently dropped)."""
    deepest = deepest_levels(patch)
    if spec == "none":
        wanted = []
    elif spec == "auto":
        wanted = sorted({deepest, 2 * levels} - set(range(levels + 1)))
    else:
        try:
            wanted = sorted({int(v) for v in spec.split(",") if v.strip()})
        except ValueError:
            wanted = []
        if not wanted or min(wanted) <= levels:
            raise ValueError(f"--stage-b-levels: expected 'auto', 'none' or levels > --levels ({levels}), got {spec!r}")
    infeasible = {d: f"{patch} px patches hold at most {deepest} levels (coarsest level at least 2x2)"
                  for d in wanted if d > deepest}
    return [d for d in wanted if d <= deepest], infeasible


def loss_scale(scan, kind):
    """The fixed normaliser of the physics loss: mean observed amplitude (or intensity) of a scan."""
    obs = scan.diffraction.double()
    return float(obs.mean() if kind == "mae" else obs.square().mean())


def evaluate(model, scan, probe, args, scale, batch=64):
    """Validation loss over all patches of a scan, and the stitched reconstruction."""
    model.eval()
    losses, amps, phases = [], [], []
    with torch.no_grad(), autocast(probe.device, args.precision):
        for i in range(0, len(scan.diffraction), batch):
            x = scan.diffraction[i:i + batch].to(probe.device)
            rec = model(x)
            losses.append(physics_loss(rec, x, probe, args.loss, scale) * len(x))
            amps.append(rec.amplitude.float().cpu())
            phases.append(rec.phase.float().cpu())
    model.train()
    loss = float(torch.stack(losses).sum()) / len(scan.diffraction)
    return loss, stitch(torch.cat(amps), scan.grid, scan.stride), stitch(torch.cat(phases), scan.grid, scan.stride)


def activation_profile(model, x):
    with ActivationMonitor(model, module_types=(FNOBlock, StableFNOBlock)) as monitor, torch.no_grad():
        model(x)
    return {name: {"mean": s.mean, "std": s.std, "abs_max": s.abs_max} for name, s in monitor.stats().items()}


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
    arm = ARMS[arm_name]
    gen = seed_everything(seed)
    probe = make_probe(args.patch)
    train = simulate(args.size, args.patch, args.stride, probe, args.nphotons, generator=gen)
    test = simulate(args.size, args.patch, args.stride, probe, args.nphotons, generator=gen)
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
    warmup = int(args.warmup * total)
    # no non-finite skip: a diverging arm must fail; arms without clipping measure the norm (clip at inf)
    stepper = Stepper(model, opt, precision=args.precision, device=device, skip_nonfinite=False,
                      clip=arm.clip or "norm", clip_value=arm.clip_value if arm.clip else math.inf,
                      schedule=lambda s: warmup_cosine(s, total, warmup, args.lr, min_lr=0.01 * args.lr))
    probe_batch = train_x[: args.batch_size]
    act_init = activation_profile(model, probe_batch)
    init_val, amp, phase = evaluate(model, test, probe, args, scale)
    curve, grad_norms, finite = [], [], True
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
                kill_point(args.kill_at_step, steps_before + stepper.steps)
            epoch_loss += loss.detach() * len(x)
        epoch_loss = all_reduce_sum(epoch_loss) if args.fsdp else epoch_loss
        val, amp, phase = evaluate(model, test, probe, args, scale)
        curve.append(dict(step=stepper.steps, epoch=epoch + 1, train_loss=float(epoch_loss) / n, val_loss=val, lr=lr))
        if not (math.isfinite(curve[-1]["train_loss"]) and math.isfinite(val)):
            finite = False
            break
    b = (args.patch - args.stride) // 2
    region = test.obj[b:b + amp.shape[0], b:b + amp.shape[1]]
    metrics = reconstruction_metrics(amp, phase, region) if finite else {}
    norms = torch.stack(grad_norms).double().cpu() if grad_norms else torch.full((1,), math.nan)
    vals = [c["val_loss"] for c in curve]
    best = min(vals) if vals else math.nan
    failure = classify_failure(finite, best, vals[-1] if vals else math.nan, metrics.get("amp_cv", 0.0))
    record = {
        "stage": job.stage, "arm": arm_name, "seed": seed, "levels": job.levels, "failure": failure,
        "params": count_parameters(model), "init_val": init_val,
        "best_val": best, "final_val": vals[-1] if vals else math.nan, "curve": curve, **metrics,
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
        save_file({"amplitude": amp.contiguous(), "phase": phase.contiguous(),
                   "true_amplitude": region.abs().contiguous(), "true_phase": region.angle().contiguous()},
                  f"{stem}_recon.safetensors")
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
    run = RunDir(args.out, run_config(args, ignore=("stage_b", "stage_b_infeasible")), resume=args.resume,
                 overwrite=args.overwrite)
    say = main_print(info.is_main)
    for folder in ("runs", "stage_b"):  # on every rank: each writes the runs it trains
        run.file(folder).mkdir(exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))
    stress = args.epochs > EPOCH_CAP
    kind = f"STRESS TEST ({args.epochs} epochs > the plan's {EPOCH_CAP}-epoch cap)" if stress else "comparison run"
    say(f"FNO shootout, {kind}: {len(args.arms.split(','))} arms x {args.seeds} seeds at {args.levels} levels, "
        f"widths capped at {args.max_channels}")

    # --- Stage A: every arm, every seed -------------------------------------------------------------
    arm_names = args.arms.split(",")
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
            "run_kind": "stress test" if stress else "comparison", "epochs": args.epochs,
            "arms": {a: ARMS[a].description for a in arm_names}, "table": rows,
            "params": {r["arm"]: r["params"] for r in records},
            "stage_b": {"arm": winner, "levels": deep_rows, "params": {r["levels"]: r["params"] for r in deep},
                        "not_run": args.stage_b_infeasible},
            "verdict": {**verdict._asdict(), "checks": [c._asdict() for c in verdict.checks]}})
        print_table(rows)
        if deep_rows:
            print(f"\nStage B: {winner} at more levels (widths capped at {args.max_channels})")
            print_table({f"{winner} @{d} levels": row for d, row in deep_rows.items()})
        print_verdict(verdict)
        if stress:
            print(f"(a stress test: {args.epochs} epochs exceed the plan's {EPOCH_CAP}-epoch cap for comparison runs)")
        plot(records, rows, run)
        print(f"wrote {run.path / 'summary.json'}, {run.path / 'metrics.jsonl'} and PNG plots")
    run.finish()
    teardown_distributed()


if __name__ == "__main__":
    main()
