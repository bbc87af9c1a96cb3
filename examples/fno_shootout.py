"""FNO stability shootout: which residual block or clipping rule keeps a hybrid U-NO training?

System: the FNO / hybrid U-NO stability study. The original drew conclusions from one seed, half
the Fourier modes, a channel cap that never reached the model, a schedule that never stepped and
phase metrics on phase-free data. Here every arm (hybrid, hybrid + norm clip, hybrid + AGC, stable
zero-gamma, stable LayerScale) trains on the same simulated grid-lines ptychography data for N
seeds, with a warmup + cosine schedule that steps every optimizer step, and the run reports per
arm: failures / n, median and IQR over the successful runs of best and final validation loss and
of amplitude and phase SSIM, gradient-norm median / p99 / max, and activation mean / std per block
versus depth at init and at the end.

A run (one arm, one seed) trains in one process, so --batch-size (the global batch) is its batch;
torchrun's processes share out the runs. A run is finished once OUT/runs/<arm>_seed<s>.json is
written (after its weights); --resume auto keeps the finished runs and starts the others anew.

    python examples/fno_shootout.py                      # CPU default, 5 arms x 3 seeds
    python examples/fno_shootout.py --deep               # more FNO blocks per level
    torchrun --standalone --nproc_per_node=2 examples/fno_shootout.py   # runs shared across ranks
    python examples/fno_shootout.py --resume auto        # continue an interrupted sweep
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fno.arms import ARMS, PtychoNet, classify_failure, physics_loss, reconstruction_metrics
from fno.sim import make_probe, simulate, stitch

from blockyard.blocks import FNOBlock, StableFNOBlock, count_parameters
from blockyard.data import write_json_atomic
from blockyard.train import (
    ActivationMonitor,
    Dashboard,
    RunDir,
    Stepper,
    add_common_args,
    autocast,
    barrier,
    kill_point,
    main_print,
    pyplot,
    run_config,
    seed_everything,
    setup_distributed,
    sweep_summary,
    teardown_distributed,
    warmup_cosine,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/fno", epochs=30, batch_size=16, lr=1e-3)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    p.add_argument("--seeds", type=int, default=3, help="runs per arm; run i uses the seed (--seed + i)")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup as a fraction of all steps")
    p.add_argument("--loss", default="mae", choices=["mae", "poisson"])
    p.add_argument("--size", type=int, default=96, help="object size in px")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--modes", type=int, default=8)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--blocks-per-level", type=int, default=1)
    p.add_argument("--nphotons", type=float, default=1e9)
    p.add_argument("--deep", action="store_true", help="stress test: 3 blocks per level (never more levels)")
    args = p.parse_args(argv)
    if args.smoke:  # tiny sizes as defaults: flags given explicitly still win
        p.set_defaults(size=40, patch=16, stride=8, hidden=4, modes=4, levels=2, epochs=2, seeds=1, batch_size=4)
        args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    if args.deep:
        args.blocks_per_level = max(args.blocks_per_level, 3)
    return args


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


def load_record(runs, arm, seed):
    """The record of a finished run; None if the run has not finished (no record, or an unreadable one)."""
    try:
        return json.loads((runs / f"{arm}_seed{seed}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def run_one(arm_name, seed, args, runs, device, steps_before=0):
    """Train one arm with one seed; write its weights, then its record (which marks the run finished).

    --kill-at-step K (tests) SIGKILLs this process at its K-th optimizer step of the sweep, this run's
    steps counted after the ``steps_before`` of the runs it finished: a K past one run kills mid-sweep.
    """
    arm = ARMS[arm_name]
    gen = seed_everything(seed)
    probe = make_probe(args.patch)
    train = simulate(args.size, args.patch, args.stride, probe, args.nphotons, generator=gen)
    test = simulate(args.size, args.patch, args.stride, probe, args.nphotons, generator=gen)
    probe, train_x = probe.to(device), train.diffraction.to(device)  # simulated on the CPU, trained anywhere
    torch.manual_seed(seed)  # the same init for every arm of this seed
    rms = float(train.diffraction.square().mean().sqrt())
    scale = loss_scale(train, args.loss)
    model = PtychoNet(arm.block, args.hidden, args.levels, args.modes, args.blocks_per_level, rms).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))  # ~4x faster step
    n = len(train.diffraction)
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
            x = train_x[order[i:i + args.batch_size]]
            with stepper.micro_batch(j) as mb:
                with autocast(device, args.precision):
                    loss = physics_loss(model(x), x, probe, args.loss, scale)
                stepper.backward(loss)
            lr = stepper.lr
            if mb.step and stepper.step():  # False only when the fp16 scaler skips an overflow
                grad_norms.append(stepper.grad_norm)
                kill_point(args.kill_at_step, steps_before + stepper.steps)
            epoch_loss += loss.detach() * len(x)
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
        "arm": arm_name, "seed": seed, "failure": failure, "params": count_parameters(model), "init_val": init_val,
        "best_val": best, "final_val": vals[-1] if vals else math.nan, "curve": curve, **metrics,
        "grad_norm": {"median": float(norms.median()), "p99": float(norms.quantile(0.99)),
                      "max": float(norms.max()), "steps": len(grad_norms)},
        "activations_init": act_init, "activations_end": activation_profile(model, probe_batch) if finite else {},
        "stepper": stepper.state_dict(), "train_s": time.perf_counter() - start,  # stepper: steps, skips, fp16 scale
    }
    # weights first (pickle-free); the record, written last and atomically, marks the run finished
    stem = runs / f"{arm_name}_seed{seed}"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{stem}_model.safetensors")
    save_file({"amplitude": amp.contiguous(), "phase": phase.contiguous(),
               "true_amplitude": region.abs().contiguous(), "true_phase": region.angle().contiguous()},
              f"{stem}_recon.safetensors")
    write_json_atomic(f"{stem}.json", record)  # by the rank that trained it (RunDir writes on rank 0 only)
    return record


def summarize(records, arm_names):
    """Per-arm table rows: failures / n and median [IQR] over the successful runs."""
    rows = {}
    for arm in arm_names:
        runs = [r for r in records if r["arm"] == arm]
        failed = [r["failure"] is not None for r in runs]
        row = {"n": len(runs), "failures": sum(failed), "failure_kinds": [r["failure"] for r in runs if r["failure"]]}
        for key in ("best_val", "final_val", "amp_ssim", "phase_ssim", "amp_mae", "phase_mae"):
            row[key] = sweep_summary([r.get(key) for r in runs], failed)._asdict()
        # gradient-norm statistics over the successful runs (a diverged run's are NaN/inf)
        pooled = [r["grad_norm"] for r, f in zip(runs, failed) if not f] or [r["grad_norm"] for r in runs]
        row["grad_norm"] = {k: float(torch.tensor([g[k] for g in pooled]).median()) for k in ("median", "p99", "max")}
        for when in ("activations_init", "activations_end"):
            blocks = [b for b in (runs[0][when] if runs else {})]
            row[when] = {b: {s: float(torch.tensor([r[when][b][s] for r in runs if b in r[when]]).mean())
                             for s in ("mean", "std")} for b in blocks}
        rows[arm] = row
    return rows


def print_table(rows, file=sys.stdout):
    def cell(s):
        return "-" if math.isnan(s["median"]) else f"{s['median']:.4f} [{s['q25']:.4f}, {s['q75']:.4f}]"

    head = (f"{'arm':<18} {'fail':>5}  {'best val':<26} {'final val':<26} {'amp SSIM':<26} {'phase SSIM':<26} "
            "grad med/p99/max")
    print(head, file=file)
    print("-" * len(head), file=file)
    for arm, r in rows.items():
        g = r["grad_norm"]
        print(f"{arm:<18} {r['failures']}/{r['n']:<3}  {cell(r['best_val']):<26} {cell(r['final_val']):<26} "
              f"{cell(r['amp_ssim']):<26} {cell(r['phase_ssim']):<26} "
              f"{g['median']:.3g}/{g['p99']:.3g}/{g['max']:.3g}", file=file)
    for stat in ("mean", "std"):
        print(f"\nactivation {stat} per block vs depth (init -> end, mean over seeds):", file=file)
        for arm, r in rows.items():
            end = r["activations_end"]
            pairs = [f"{r['activations_init'][b][stat]:.3g}->{end.get(b, {}).get(stat, math.nan):.3g}"
                     for b in r["activations_init"]]
            print(f"  {arm:<18} " + "  ".join(pairs), file=file)


def plot(records, rows, run):
    if (plt := pyplot()) is None:
        print("matplotlib not installed: skipping plots (pip install blockyard[examples])")
        return
    arms = list(rows)
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for r in (r for r in records if r["arm"] == arm):
            ax.plot([c["epoch"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]],
                    color="C3" if r["failure"] else "C0", lw=1)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(run.file("loss_curves.png"), dpi=100)
    plt.close(fig)
    first = {arm: min((r for r in records if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}
    fig, axes = plt.subplots(2, len(arms) + 1, figsize=(2.4 * (len(arms) + 1), 5), squeeze=False)
    for j, arm in enumerate(arms):
        rec = load_file(str(run.path / "runs" / f"{arm}_seed{first[arm]['seed']}_recon.safetensors"))
        if j == 0:
            axes[0][0].imshow(rec["true_amplitude"], cmap="gray")
            axes[1][0].imshow(rec["true_phase"], cmap="twilight")
            axes[0][0].set_title("ground truth", fontsize=9)
        axes[0][j + 1].imshow(rec["amplitude"], cmap="gray")
        axes[1][j + 1].imshow(rec["phase"], cmap="twilight")
        axes[0][j + 1].set_title(arm, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(run.file("reconstructions.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    info = setup_distributed()
    run = RunDir(args.out, run_config(args), resume=args.resume, overwrite=args.overwrite)
    say = main_print(info.is_main)
    runs = run.file("runs")
    runs.mkdir(exist_ok=True)  # on every rank: each writes the runs it trains
    arm_names = args.arms.split(",")
    jobs = [(a, args.seed + i) for i in range(args.seeds) for a in arm_names]
    todo = [j for j in jobs if not run.resumed or load_record(runs, *j) is None]
    barrier()  # every rank has listed the finished runs before any rank adds one
    mine, steps = todo[info.rank::info.world_size], 0
    torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))
    say(f"FNO shootout: {len(arm_names)} arms x {args.seeds} seeds = {len(jobs)} runs "
        f"({len(jobs) - len(todo)} already done), {info.world_size} process(es); out: {run.path}")
    with Dashboard(total=max(1, len(mine)), every_s=0 if args.smoke else 30, is_main=info.is_main) as dash:
        for k, (arm, seed) in enumerate(mine):
            r = run_one(arm, seed, args, runs, info.device, steps)
            steps += r["stepper"]["steps"]
            dash.update(k + 1, arm=arm, seed=seed, best_val=r["best_val"], failure=r["failure"] or "none")
    barrier()
    if info.is_main:
        records = [load_record(runs, a, s) for a, s in jobs]
        with run.metrics_log("metrics.jsonl") as log:  # rebuilt from the records on every (resumed) run
            for r in records:
                for c in r["curve"]:
                    log.log(c["step"], arm=r["arm"], seed=r["seed"], **{k: v for k, v in c.items() if k != "step"})
        rows = summarize(records, arm_names)
        run.write_json("summary.json", {"arms": {a: ARMS[a].description for a in arm_names}, "table": rows,
                                        "params": {r["arm"]: r["params"] for r in records}})
        print_table(rows)
        plot(records, rows, run)
        print(f"wrote {run.path / 'summary.json'}, {run.path / 'metrics.jsonl'} and PNG plots")
    run.finish()
    teardown_distributed()


if __name__ == "__main__":
    main()
