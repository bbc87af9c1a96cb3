"""The sbatch scripts' FSDP switch and the multi-node rendezvous, read from the command line each would start.

Each script runs under bash with ``PYTHON=echo``, an ``srun`` that runs its arguments and an ``scontrol``
that lists many hosts (a reader that stops at the first would break the pipe), so the job's command line is
printed instead of run."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[2] / "examples" / "slurm"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def command_line(script: str, tmp_path: Path, *args: str, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"'),
                       ("scontrol", 'printf "gpu-a17\\ngpu-a18\\n"; seq -f "gpu-b%g" 20000')):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "echo", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SLURM / script), *args], capture_output=True, text=True, env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].split()


def test_single_node_script_takes_fsdp(tmp_path):
    assert "--fsdp" in command_line("fusion_train.sbatch", tmp_path, FSDP="1")
    assert "--fsdp" not in command_line("fusion_train.sbatch", tmp_path)
    assert "--fsdp" not in command_line("fusion_train.sbatch", tmp_path, FSDP="0")


def test_multinode_script_meets_at_the_first_node_and_shards_by_default(tmp_path):
    env = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[17-18]", "GPUS": "8"}
    argv = command_line("fusion_train_multinode.sbatch", tmp_path, "--epochs", "30", RESUME="auto", **env)
    launcher, script = argv[:argv.index("examples/fusion_ddp.py")], argv[argv.index("examples/fusion_ddp.py") + 1:]
    assert launcher == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_id=4242",
                        "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a17:29500"]
    assert script == ["--out", "runs/fusion", "--data", "runs/fusion/data", "--fsdp", "--resume", "auto",
                      "--epochs", "30"]
    ddp = command_line("fusion_train_multinode.sbatch", tmp_path, FSDP="0", RDZV_PORT="6000", **env)
    assert "--fsdp" not in ddp and "--rdzv_endpoint=gpu-a17:6000" in ddp
