"""The FNO shootout's report: the per-arm table, the plots, and the plan's verdict in words."""
from __future__ import annotations

import math
import sys

import torch
from safetensors.torch import load_file

from blockyard.train import pyplot, sweep_summary

from .verdict import Verdict

__all__ = ["plot", "print_clip_sweep", "print_table", "print_verdict", "summarize"]


def summarize(records, arm_names):
    """Per-arm rows: failures / n, each failed run's step of failure, median [IQR] over the successful runs."""
    rows = {}
    for arm in arm_names:
        runs = [r for r in records if r["arm"] == arm]
        failed = [r["failure"] is not None for r in runs]
        row = {"n": len(runs), "failures": sum(failed), "failure_kinds": [r["failure"] for r in runs if r["failure"]],
               "failure_steps": sorted(r["failure_step"] for r in runs if r["failure"]),
               "failures_at": sorted([r["failure_step"], r["failure"]] for r in runs if r["failure"])}
        for key in ("best_val", "final_val", "test_loss", "amp_ssim", "phase_ssim", "phase_ssim_patch", "amp_mae",
                    "phase_mae", "phase_mae_patch"):
            row[key] = sweep_summary([r.get(key) for r in runs], failed)._asdict()
        # gradient-norm statistics over the successful runs (a diverged run's are NaN/inf)
        pooled = [r["grad_norm"] for r, f in zip(runs, failed) if not f] or [r["grad_norm"] for r in runs]
        row["grad_norm"] = {k: float(torch.tensor([g[k] for g in pooled]).median()) for k in ("median", "p99", "max")}
        peaks = [r["grad_norm"]["max"] for r in runs]  # every run's, failed ones included
        row["grad_norm"]["worst"] = max(peaks) if peaks and all(map(math.isfinite, peaks)) else math.nan
        for when in ("activations_init", "activations_end"):
            blocks = [b for b in (runs[0][when] if runs else {})]
            row[when] = {b: {s: float(torch.tensor([r[when][b][s] for r in runs if b in r[when]]).mean())
                             for s in ("mean", "std")} for b in blocks}
        rows[arm] = row
    return rows


def _cell(s):
    return "-" if math.isnan(s["median"]) else f"{s['median']:.4f} [{s['q25']:.4f}, {s['q75']:.4f}]"


def _steps(r):
    """Each failed run's step of first failure and its kind (the end-of-run rule's), e.g. ``19 stalled``."""
    return ", ".join(f"{step} {kind}" for step, kind in r.get("failures_at", [])) or "-"


def print_table(rows, file=sys.stdout, activations=True):
    """Failures / n, the failed runs' steps of failure, and median [IQR] over the successful runs: best and
    final validation loss, test loss, amplitude SSIM, phase SSIM stitched as predicted and per-patch aligned."""
    width = max([22, *map(len, rows)])
    head = (f"{'arm':<{width}} {'fail':>5}  {'best val':<26} {'final val':<26} {'test loss':<26} {'amp SSIM':<26} "
            f"{'phase SSIM':<26} {'phase SSIM per patch':<26} {'grad med/p99/max':<22} failed at step (kind)")
    print(head, file=file)
    print("-" * len(head), file=file)
    for arm, r in rows.items():
        g = r["grad_norm"]
        grad = f"{g['median']:.3g}/{g['p99']:.3g}/{g['max']:.3g}"
        print(f"{arm:<{width}} {r['failures']}/{r['n']:<3}  {_cell(r['best_val']):<26} {_cell(r['final_val']):<26} "
              f"{_cell(r['test_loss']):<26} {_cell(r['amp_ssim']):<26} {_cell(r['phase_ssim']):<26} "
              f"{_cell(r['phase_ssim_patch']):<26} {grad:<22} {_steps(r)}", file=file)
    if not activations:
        return
    for stat in ("mean", "std"):
        print(f"\nactivation {stat} per block vs depth (init -> end, mean over seeds):", file=file)
        for arm, r in rows.items():
            end = r["activations_end"]
            pairs = [f"{r['activations_init'][b][stat]:.3g}->{end.get(b, {}).get(stat, math.nan):.3g}"
                     for b in r["activations_init"]]
            print(f"  {arm:<22} " + "  ".join(pairs), file=file)


def print_clip_sweep(rows, sweep, file=sys.stdout):
    """The control's clip sweep: one line per global norm clip (and the unclipped control when it ran)."""
    print("\nclip sweep of the control (hybrid + global norm clip):", file=file)
    lines = {**({"none (hybrid)": "hybrid"} if "hybrid" in rows else {}),
             **{f"{v:g} ({arm})": arm for v, arm in sorted(sweep.items())}}
    print(f"  {'clip':<24} {'fail':>5}  {'best val':<26} {'test loss':<26} {'amp SSIM':<26} {'grad med/p99/max':<22} "
          "failed at step (kind)", file=file)
    for label, arm in lines.items():
        r, g = rows[arm], rows[arm]["grad_norm"]
        grad = f"{g['median']:.3g}/{g['p99']:.3g}/{g['max']:.3g}"
        print(f"  {label:<24} {r['failures']}/{r['n']:<3}  {_cell(r['best_val']):<26} {_cell(r['test_loss']):<26} "
              f"{_cell(r['amp_ssim']):<26} {grad:<22} {_steps(r)}", file=file)


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
    # each arm's lowest-seed run that has a reconstruction (a non-finite run has none); rows: amplitude,
    # phase as stitched, phase with each patch's offset removed (the per-patch score's input)
    files = {arm: [run.path / "runs" / f"{arm}_seed{r['seed']}_recon.safetensors"
                   for r in sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])] for arm in arms}
    found = {arm: next((f for f in fs if f.exists()), None) for arm, fs in files.items()}
    fig, axes = plt.subplots(3, len(arms) + 1, figsize=(2.4 * (len(arms) + 1), 7.5), squeeze=False)
    for j, arm in enumerate(arms):
        axes[0][j + 1].set_title(arm, fontsize=9)
        if found[arm] is None:
            continue
        rec = load_file(str(found[arm]))
        axes[0][0].imshow(rec["true_amplitude"], cmap="gray")
        axes[1][0].imshow(rec["true_phase"], cmap="twilight")
        axes[2][0].imshow(rec["true_phase"], cmap="twilight")
        axes[0][0].set_title("ground truth", fontsize=9)
        axes[0][j + 1].imshow(rec["amplitude"], cmap="gray")
        axes[1][j + 1].imshow(rec["phase"], cmap="twilight")
        axes[2][j + 1].imshow(rec["phase_patch_aligned"], cmap="twilight")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(run.file("reconstructions.png"), dpi=100)
    plt.close(fig)


def print_verdict(verdict: Verdict, file=sys.stdout) -> None:
    """The plan's verdict, its reasons, and every condition it evaluated (yes / no / ? = cannot be judged)."""
    print(f"\nplan verdict: {verdict.verdict.upper()} (Stage A winner: {verdict.winner})", file=file)
    for reason in verdict.reasons:
        print(f"  - {reason}", file=file)
    print("conditions:", file=file)
    for check in verdict.checks:
        mark = {True: "yes", False: "no", None: "?"}[check.passed]
        print(f"  [{mark:>3}] {check.name}: {check.detail}", file=file)
