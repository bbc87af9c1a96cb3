"""fusion_ddp.py --fsdp: FSDP2 training with sharded checkpoints, killed at 2 processes, resumed in 1 (python)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fusion import build_data
from run_contract import run
from safetensors import safe_open
from torchrun_helpers import read_metrics

from blockyard.data import BucketBatchSampler, GroupedStore

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fusion_ddp.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_run_killed_at_two_processes_resumes_at_one_from_its_sharded_checkpoint(tmp_path):
    data = build_data.ensure_dataset(tmp_path / "data", smoke=True, workers=2)
    out = tmp_path / "run"
    flags = ("--data", str(data), "--fsdp", "--ema", "0.9", "--batch-size", "32")  # the global batch at both sizes
    per_epoch = len(BucketBatchSampler(GroupedStore(data / "train", verify=False), 16, drop_last=True, world_size=2))
    code, text = run(SCRIPT, out, *flags, "--kill-at-step", str(per_epoch + 2))  # killed in epoch 2
    assert code != 0 and not (out / "summary.json").exists(), text[-3000:]
    (step,) = sorted((out / "checkpoints").glob("step_*"))
    assert step.name == "step_00000001"
    body = json.loads((step / "manifest.json").read_text())["body"]
    assert body["layout"] == "sharded" and body["world_size"] == 2 and {"model", "ema", "optimizer"} <= set(
        body["entries"])
    shards = sorted((step / "shards").iterdir())
    assert len(shards) == 2  # each rank wrote its own file
    second = json.loads(safe_open(shards[1], "pt").metadata()["DCP_SHARDING_INFO"])
    # sharded, not replicated: rank 1 holds the second half of every encoder convolution (a row offset > 0),
    # where DDP would leave each whole tensor to one rank (offset 0)
    offsets = {k: v["saved_offsets"][0] for k, v in second.items() if k.startswith("model/encoders.") and "conv" in k}
    assert offsets and all(o > 0 for o in offsets.values()), second

    # `python fusion_ddp.py`: no process group, so a plain model loads the 2-rank shards
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *flags, "--resume", "auto"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "resumed from" in text
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["skipped_steps"] == 0
    # it learned across the change of world size: the EMA model's validation loss fell (0.115 in a run
    # without the kill); with the optimizer step a no-op it stays equal
    assert records[1]["loss"] < records[0]["loss"] - 0.03, records
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["best_epoch"] == 2
    assert {"setting1", "setting2", "overall"} <= set(summary["inference"])
