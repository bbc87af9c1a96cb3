"""The FusionNet sbatch scripts pass the seed's environment variables (DATASET_JSONL, TEST_JSONL, ...) on as flags.

Each script runs under bash with ``PYTHON=echo`` and an ``srun`` that runs its arguments, so the command line the
job would start is printed instead of run."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[2] / "examples" / "slurm"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def command_line(script: str, tmp_path: Path, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "echo", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SLURM / script)], capture_output=True, text=True, env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].split()


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_build_takes_dataset_jsonl(tmp_path):
    argv = command_line("fusion_build_data.sbatch", tmp_path, DATASET_JSONL="final_dataset.jsonl", DATA="d")
    assert argv[0] == "examples/fusion/build_data.py"
    assert (flag(argv, "--trajectories"), flag(argv, "--out")) == ("final_dataset.jsonl", "d")
    assert "--trajectories" not in command_line("fusion_build_data.sbatch", tmp_path)


def test_train_takes_dataset_jsonl_test_jsonl_levels_and_warmup(tmp_path):
    argv = command_line("fusion_train.sbatch", tmp_path, DATASET_JSONL="train.jsonl", TEST_JSONL="test.jsonl",
                        LEVELS="4", WARMUP="2000")
    assert argv[:2] == ["-m", "torch.distributed.run"] and "examples/fusion_ddp.py" in argv
    assert [flag(argv, f) for f in ("--trajectories", "--test-trajectories", "--levels", "--warmup")] == \
        ["train.jsonl", "test.jsonl", "4", "2000"]
    plain = command_line("fusion_train.sbatch", tmp_path)
    assert not {"--trajectories", "--test-trajectories", "--levels", "--warmup"} & set(plain)


def test_infer_takes_test_jsonl(tmp_path):
    argv = command_line("fusion_infer.sbatch", tmp_path, TEST_JSONL="test.jsonl", CHECKPOINT="ck", N_SAMPLES="25")
    assert argv[0] == "examples/fusion_ddp.py"
    assert [flag(argv, f) for f in ("--eval", "--test-trajectories", "--n-per-pattern")] == ["ck", "test.jsonl", "25"]


def test_build_is_at_the_gpu_scale_by_default(tmp_path):
    argv = command_line("fusion_build_data.sbatch", tmp_path, SLURM_CPUS_PER_TASK="32")
    assert [flag(argv, f) for f in ("--sizes", "--per-cell", "--iters-scale", "--workers")] == ["seed", "200", "area",
                                                                                              "32"]
    small = command_line("fusion_build_data.sbatch", tmp_path, SIZES="16x16,32x32", PER_CELL="5", ITERS="900",
                         ITERS_SCALE="fixed")
    assert [flag(small, f) for f in ("--sizes", "--per-cell", "--iters", "--iters-scale")] == \
        ["16x16,32x32", "5", "900", "fixed"]
    jsonl = command_line("fusion_build_data.sbatch", tmp_path, DATASET_JSONL="f.jsonl")
    assert not {"--sizes", "--per-cell", "--iters-scale"} & set(jsonl)  # a trajectory file fixes the data


def full_output(script: str, tmp_path: Path, **env: str) -> list[list[str]]:
    command_line(script, tmp_path, **env)  # asserts success
    bin_dir = tmp_path / "bin"
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "echo", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SLURM / script)], capture_output=True, text=True, env=full, timeout=60)
    return [line.split() for line in proc.stdout.strip().splitlines()]


def test_train_builds_a_missing_dataset_at_the_gpu_scale_first_and_passes_targets_and_perturbation(tmp_path):
    lines = full_output("fusion_train.sbatch", tmp_path, DATA="d", SLURM_CPUS_PER_TASK="24", TARGETS="teacher",
                        PERTURB="0.25", PERTURB_STEPS="3")
    build = next(line for line in lines if line and line[0] == "examples/fusion/build_data.py")
    assert [flag(build, f) for f in ("--out", "--sizes", "--per-cell", "--iters-scale", "--workers")] == \
        ["d", "seed", "200", "area", "24"]
    train = lines[-1]
    assert flag(train, "--data") == "d" and "examples/fusion_ddp.py" in train
    assert [flag(train, f) for f in ("--targets", "--perturb", "--perturb-steps")] == ["teacher", "0.25", "3"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "build.json").write_text("{}")  # a finished dataset is used as it is
    again = full_output("fusion_train.sbatch", tmp_path, DATA="d")
    assert not any(line and line[0] == "examples/fusion/build_data.py" for line in again)
    assert not {"--targets", "--perturb", "--perturb-steps"} & set(again[-1])
    jsonl = full_output("fusion_train.sbatch", tmp_path, DATA="e", DATASET_JSONL="f.jsonl")
    assert not any(line and line[0] == "examples/fusion/build_data.py" for line in jsonl)  # fusion_ddp imports it
