"""Launch an example under torchrun in a test, and read its metrics without the timing fields."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_example(script: Path, out: Path, *extra: str, nproc: int = 2,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc script --smoke --out out *extra``; fails the test on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(script), "--smoke", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_metrics(path: Path) -> list[dict]:
    """A metrics.jsonl's records without the ``*_s`` wall-clock fields (they differ between runs)."""
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in lines]
