"""fusion_study.py: every (variant, seed) runs with its own flags on one dataset, the table is the
median [IQR] of the runs' own summaries, and --resume auto reads finished runs instead of rerunning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fusion_study.py"


def test_variants_keep_commas_inside_their_flags():
    from fusion_study import parse_args, split_variants

    assert split_variants("default,teacher") == ["default", "teacher"]
    assert split_variants("default,wide=--widths 8,16,32,32,teacher") == ["default", "wide=--widths 8,16,32,32",
                                                                           "teacher"]
    args = parse_args(["--variants", "no-perturb,w=--widths 8,16 --perturb 0.2", "--seeds", "3,4"])
    assert args.variants == [("no-perturb", ["--perturb", "0"]), ("w", ["--widths", "8,16", "--perturb", "0.2"])]
    assert args.seeds == [3, 4]
    for bad in (["--variants", "nope"], ["--seeds", "a"], ["--seeds", ","], ["--nproc", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_each_run_gets_its_variant_seed_and_the_shared_dataset():
    from fusion_study import command, parse_args

    args = parse_args(["--out", "o", "--nproc", "2", "--extra", "--epochs 2", "--resume", "auto"])
    cmd = command(args, ["--targets", "teacher"], 3, Path("o/teacher/seed3"))
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in cmd
    flags = cmd[cmd.index(str(SCRIPT.parent / "fusion_ddp.py")) + 1:]
    assert flags == ["--out", "o/teacher/seed3", "--data", "o/data", "--seed", "3", "--targets", "teacher",
                     "--epochs", "2", "--resume", "auto"]
    one = command(parse_args(["--nproc", "1", "--smoke"]), [], 0, Path("x"))
    assert one[:2] == [sys.executable, str(SCRIPT.parent / "fusion_ddp.py")] and one[-1] == "--smoke"
    assert "--resume" not in one


def test_cells_are_the_median_and_quartiles_of_the_runs():
    from fusion_study import cell, table

    values = [0.5, 0.9, 0.6, 0.7]
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    assert cell(values, "pct") == f"{100 * med:.1f}% [{100 * q25:.1f}%, {100 * q75:.1f}%]"
    assert cell([2.0], "f2") == "2.00"
    assert cell([None, 1.0], "f2") == "1.00 (1 missing)"
    assert cell([None], "f2") == "-"
    runs = {"a": [{"final": {"improving_top1": v}} for v in values], "b": [{"final": {"improving_top1": 0.1}}]}
    text = table(runs)
    assert "| a (4 seeds) | b (1 seeds) |" in text
    assert f"| val improving top-1 | {cell(values, 'pct')} | 10.0% |" in text


@pytest.mark.slow
def test_smoke_study_runs_each_variant_and_resume_reads_them(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--variants", "teacher", "--seeds", "1",
           "--nproc", "1", "--smoke"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    config = json.loads((out / "teacher" / "seed1" / "run.json").read_text())
    assert config["config"]["targets"] == "teacher" and config["config"]["seed"] == 1
    assert (out / "data").is_dir() and not (out / "teacher" / "seed1" / "data").exists()  # the shared dataset
    study = json.loads((out / "study.json").read_text())
    summary = json.loads((out / "teacher" / "seed1" / "summary.json").read_text())
    assert study["runs"]["teacher"][0]["val improving top-1"] == summary["final"]["improving_top1"]
    assert "| val improving top-1 |" in first.stdout and "teacher (1 seeds)" in first.stdout

    again = subprocess.run([*cmd, "--resume", "auto"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("read ") == 1 and "fusion_ddp.py" not in again.stdout
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # used folders, no --resume
    assert refused.returncode != 0
