"""Design decomposition, all five stages in order: one command from rendered designs to latent optimisation.

System: design decomposition. Each stage is its own script, runnable alone, with its own run
folder OUT/<stage> (the run contract of every example: --resume, --overwrite, one process at a
time); this script runs them in order, passing each the folders of the stages it builds on:

    1. encoder     examples/design_encoder.py     image -> structure map F (U-Net)
    2. abstractor  examples/design_abstractor.py  F -> goal, format, tone, grammar (ResNet-18)   --encoder
    3. decoder     examples/design_decoder.py     metadata -> image (conditional DDPM)           --encoder --abstractor
    4. reward      examples/design_reward.py      decoder fine-tuned on the grammar reward       + --decoder
    5. latent      examples/design_latent.py      x_T optimised through a differentiable DDIM    + --decoder

    python examples/design_all.py --nproc 2                        # CPU defaults into runs/design/, 2 cores
    python examples/design_all.py --smoke --out /tmp/design        # tiny sizes, for tests
    python examples/design_all.py --resume auto                    # continue an interrupted run
    python examples/design_all.py --stages encoder,abstractor      # some stages (the others' folders must exist)
    python examples/design_all.py --seed-scale --nproc 4           # the seed's 256 px sizes (GPUs)

On a CPU, --nproc 2 (torchrun, one thread per process) is the fast way to use 2 cores: one process
with two threads ran stage 1 2.5-4x slower on a shared machine. All five stages took 22 minutes on 2
cores (the decoder 11 of them). The dataset is built once, by the first stage, in OUT/data
(OUT/data-smoke under --smoke, OUT/data-256px at --seed-scale) and shared. A stage that fails
stops the run (exit status of the stage); --resume auto continues it and re-evaluates the
finished stages. At the end the tables of every stage's summary.json are printed together.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from design.stage import data_dir

#: stage -> (script, the earlier stages whose folders it takes as --<name>)
STAGES = {"encoder": ("design_encoder.py", ()), "abstractor": ("design_abstractor.py", ("encoder",)),
          "decoder": ("design_decoder.py", ("encoder", "abstractor")),
          "reward": ("design_reward.py", ("decoder", "encoder", "abstractor")),
          "latent": ("design_latent.py", ("decoder", "encoder", "abstractor"))}


class Step(NamedTuple):
    """One stage to run: its name, run folder and command line."""

    stage: str
    out: Path
    command: list[str]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/design", help="parent folder: OUT/<stage> per stage (default runs/design)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, run in this order: {list(STAGES)}")
    p.add_argument("--nproc", type=int, default=1, help="processes per stage (> 1: torchrun --standalone)")
    p.add_argument("--smoke", action="store_true", help="tiny data and models in every stage: seconds each")
    p.add_argument("--seed-scale", action="store_true", help="the seed's 256 px sizes in every stage")
    p.add_argument("--resume", default=None, choices=["auto"], help="continue every stage from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="move each stage's earlier run aside")
    p.add_argument("--seed", type=int, default=None, help="--seed of every stage (default: each stage's own)")
    p.add_argument("--data", default=None, help="dataset directory of every stage (default OUT/data)")
    p.add_argument("--designs", type=int, default=None, help="designs in the dataset (default: the stages' 20000)")
    p.add_argument("--size", type=int, default=None, help="rendering size in pixels (default 64, 256 seed scale)")
    p.add_argument("--workers", type=int, default=None, help="processes building the dataset")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        p.error(f"--stages: expected names from {list(STAGES)}, got {unknown or args.stages}")
    if args.nproc < 1:
        p.error(f"--nproc: expected >= 1, got {args.nproc}")
    return args


def plan(stages: list[str], out: Path, *, examples: Path = HERE, nproc: int = 1, flags: list[str] | None = None,
         data: Path | None = None) -> list[Step]:
    """The command line of every stage, in the order of :data:`STAGES`.

    ``flags`` go to every stage. A stage whose script is missing, or that builds on a stage that
    neither runs before it nor has a finished run in ``out``, raises ``FileNotFoundError`` naming it.
    """
    steps, ordered = [], [s for s in STAGES if s in stages]
    for stage in ordered:
        script, needs = STAGES[stage]
        if not (examples / script).is_file():
            raise FileNotFoundError(f"stage {stage!r}: {examples / script} does not exist, so the design "
                                    f"decomposition run cannot include it (choose --stages without it)")
        for need in needs:
            record = out / need / "run.json"
            finished = record.is_file() and json.loads(record.read_text()).get("status") == "finished"
            if need not in ordered[:ordered.index(stage)] and not finished:
                raise FileNotFoundError(f"stage {stage!r} needs a finished {need!r} stage in {out / need}; "
                                        f"add {need} to --stages (or run it first)")
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={nproc}"]
        command = [*launcher, str(examples / script), "--out", str(out / stage), *(flags or []),
                   *([] if data is None else ["--data", str(data)])]
        for need in needs:
            command += [f"--{need}", str(out / need)]
        steps.append(Step(stage, out / stage, command))
    return steps


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    size = args.size or (256 if args.seed_scale else 64)
    data = Path(args.data) if args.data else data_dir(None, str(out / "encoder"), args.smoke, size)
    flags = [*(["--smoke"] if args.smoke else []), *(["--seed-scale"] if args.seed_scale else []),
             *(["--resume", args.resume] if args.resume else []), *(["--overwrite"] if args.overwrite else [])]
    for name in ("seed", "designs", "size", "workers"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    try:
        steps = plan(args.stages, out, nproc=args.nproc, flags=flags, data=data)
    except FileNotFoundError as err:
        sys.exit(f"design_all.py: {err}")
    times = {}
    for k, step in enumerate(steps, 1):
        print(f"\n=== stage {k}/{len(steps)}: {step.stage} -> {step.out}\n$ {' '.join(step.command)}", flush=True)
        tic = time.perf_counter()
        code = subprocess.run(step.command, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        times[step.stage] = time.perf_counter() - tic
        if code != 0:
            sys.exit(f"design_all.py: stage {step.stage!r} failed (exit {code}) after {times[step.stage]:.0f} s; "
                     f"fix it and rerun with --resume auto to continue")
    print("\n=== design decomposition: every stage's table")
    for step in steps:
        summary = json.loads((step.out / "summary.json").read_text())
        print(f"\n--- {step.stage} ({times[step.stage]:.0f} s, {step.out / 'summary.json'})")
        print(summary.get("table", ""))
    print(f"\nall {len(steps)} stages in {sum(times.values()):.0f} s: "
          + ", ".join(f"{s} {t:.0f} s" for s, t in times.items()))


if __name__ == "__main__":
    main()
