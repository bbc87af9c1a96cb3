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
