"""FusionNet over seeds and ablations: one command, median [IQR] of every headline number.

System: FusionNet v2. Runs ``examples/fusion_ddp.py`` once per (variant, seed), each in its own
run folder OUT/<variant>/seed<k> with the shared run contract, all on one dataset (OUT/data,
built by the first run with the teacher's seed 0, so every run sees the same trajectories), then
prints one table: per variant, the median [25th, 75th percentile] over the seeds of the
validation metrics of the last epoch and of the inference settings.

Variants (``--variants``, comma-separated; ``name`` or ``name=flags`` for one of your own):

    default       the default command (set-valued targets, perturbation 0.5 x 2)
    teacher       --targets teacher: trained on the teacher's one pick per state
    no-perturb    --perturb 0: no state perturbation

    python examples/fusion_study.py                                   # 3 variants x seeds 0,1,2, 2 processes each
    python examples/fusion_study.py --variants default --seeds 0,1,2  # the default command's seed spread
    python examples/fusion_study.py --variants "default,wide=--widths 32,64,128,128" --seeds 0
    python examples/fusion_study.py --resume auto                     # finished runs are read, not rerun

A run whose folder already holds a ``summary.json`` is read, not rerun, only with ``--resume
auto`` (which also continues an interrupted run from its newest checkpoint); without it a used
folder is refused by the run contract, as for any example. Writes OUT/study.json (every run's
headline numbers and the summary) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from blockyard.train.sweeps import sweep_summary

HERE = Path(__file__).resolve().parent

VARIANTS = {"default": [], "teacher": ["--targets", "teacher"], "no-perturb": ["--perturb", "0"]}

#: (label, where in summary.json, format): the headline numbers of one run
METRICS = [
    ("val improving top-1", ("final", "improving_top1"), "pct"),
    ("val improving top-5", ("final", "improving_top5"), "pct"),
    ("val crossings removed by the top-1 proposal", ("final", "gain_top1"), "f2"),
    ("off-trajectory improving top-1", ("final", "off_improving_top1"), "pct"),
    ("position top-1 (teacher's pick)", ("final", "pos_acc_top1"), "pct"),
    ("position top-1 / ceiling", ("final", "pos_top1_of_ceiling"), "pct"),
    ("action at the target", ("final", "act_acc_at_gt"), "pct"),
    ("setting 1: crossings removed, model", ("inference", "setting1", "overall", "model_mean_reduction"), "f2"),
    ("setting 1: crossings removed, random order", ("inference", "setting1", "overall", "random_mean_reduction"), "f2"),
    ("setting 2: gap closed, model-guided", ("inference", "setting2", "overall", "model_gap_closed"), "pct"),
    ("setting 2: gap closed, uniform (equal proposals)", ("inference", "setting2", "overall", "uniform_gap_closed"),
     "pct"),
    ("setting 2: gap closed, uniform (equal CPU time)",
     ("inference", "setting2", "overall", "uniform_time_gap_closed"), "pct"),
    ("setting 2: gap closed, teacher's record", ("inference", "setting2", "overall", "teacher_gap_closed"), "pct"),
    ("setting 2: model beats uniform (share of grids)",
     ("inference", "setting2", "overall", "model_beats_uniform_fraction"), "pct"),
    ("setting 2: model loses to uniform (share of grids)",
     ("inference", "setting2", "overall", "model_loses_to_uniform_fraction"), "pct"),
    ("train time [s]", ("train_time_s",), "int"),
]
PATTERNS = ("islands", "left_right", "stripes", "voronoi")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fusion_study", help="parent folder: OUT/<variant>/seed<k> and OUT/data")
    p.add_argument("--variants", default="default,teacher,no-perturb",
                   help=f"comma-separated names ({', '.join(VARIANTS)}) or name=flags")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes per run (default 2; 1 runs plain python)")
    p.add_argument("--resume", choices=["auto"], default=None, help="read finished runs, continue interrupted ones")
    p.add_argument("--smoke", action="store_true", help="pass --smoke to every run (tests)")
    p.add_argument("--extra", default="", help="flags passed to every run, e.g. \"--epochs 2\"")
    args = p.parse_args(argv)
    args.variants = [parse_variant(v) for v in split_variants(args.variants)]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds: expected at least one seed")
    if args.nproc < 1:
        p.error(f"--nproc: expected >= 1, got {args.nproc}")
    return args


def split_variants(text: str) -> list[str]:
    """Split on commas that start a new ``name`` or ``name=``: flags may hold commas (``--widths 8,16``)."""
    parts: list[str] = []
    for piece in text.split(","):
        head = piece.strip().split("=", 1)[0]
        if parts and (not head or head.startswith("-") or head[0].isdigit() or " " in head):
            parts[-1] += "," + piece
        else:
            parts.append(piece.strip())
    return [p for p in parts if p]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    if not flags:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r}; expected one of {list(VARIANTS)} or name=flags")
        return name, VARIANTS[name]
    return name, shlex.split(flags)


def command(args, flags: list[str], seed: int, out: Path) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc > 1 else [sys.executable])
    cmd = [*launcher, str(HERE / "fusion_ddp.py"), "--out", str(out), "--data", str(Path(args.out) / "data"),
           "--seed", str(seed), *flags, *shlex.split(args.extra)]
    return cmd + (["--resume", "auto"] if args.resume else []) + (["--smoke"] if args.smoke else [])


def lookup(summary: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return None
        summary = summary[key]
    return summary


def fmt(value: float, kind: str) -> str:
    return {"pct": f"{100 * value:.1f}%", "f2": f"{value:.2f}", "int": f"{value:.0f}"}[kind]


def cell(values: list, kind: str) -> str:
    s = sweep_summary(values)
    if s.failures == s.n:
        return "-"
    text = fmt(s.median, kind)
    if s.n - s.failures > 1:
        text += f" [{fmt(s.q25, kind)}, {fmt(s.q75, kind)}]"
    return text + (f" ({s.failures} missing)" if s.failures else "")


def table(runs: dict[str, list[dict]]) -> str:
    names = list(runs)
    rows = [(label, [cell([lookup(r, path) for r in runs[n]], kind) for n in names]) for label, path, kind in METRICS]
    for pattern in PATTERNS:
        for who in ("model", "uniform"):
            path = ("inference", "setting2", pattern, f"{who}_gap_closed")
            rows.append((f"setting 2 {pattern}: gap closed, {who}",
                         [cell([lookup(r, path) for r in runs[n]], "pct") for n in names]))
    seeds = {n: len(runs[n]) for n in names}
    header = "| | " + " | ".join(f"{n} ({seeds[n]} seeds)" for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for name, flags in args.variants:
        runs[name] = []
        for seed in args.seeds:
            folder = out / name / f"seed{seed}"
            summary_file = folder / "summary.json"
            if not (args.resume and summary_file.exists()):
                cmd = command(args, flags, seed, folder)
                print(f"[study] {name} seed {seed}: {shlex.join(cmd)}", flush=True)
                t0 = time.perf_counter()
                result = subprocess.run(cmd)
                if result.returncode != 0:
                    raise SystemExit(f"[study] {name} seed {seed} failed with exit status {result.returncode}; "
                                     f"--resume auto continues from its checkpoints")
                print(f"[study] {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            else:
                print(f"[study] {name} seed {seed}: read {summary_file}", flush=True)
            summary = json.loads(summary_file.read_text())
            runs[name].append({**summary, "seed": seed})
    text = table(runs)
    print(f"\nFusionNet study: median [25th, 75th percentile] over seeds {args.seeds} "
          f"({time.perf_counter() - started:.0f} s)\n{text}")
    headline = {n: [{"seed": r["seed"], **{label: lookup(r, path) for label, path, _ in METRICS}} for r in rs]
                for n, rs in runs.items()}
    (out / "study.json").write_text(json.dumps({"variants": dict(args.variants), "seeds": args.seeds,
                                                "runs": headline, "table": text}, indent=1))
    print(f"wrote {out / 'study.json'}")


if __name__ == "__main__":
    main()
