"""fno_shootout.py --fsdp: each run trained by both processes together equals the run trained by one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_contract import run
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fno_shootout.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_run_on_two_processes_equals_the_run_in_one(tmp_path):
    from fno_shootout import Job, parse_args, run_one

    # batches of 7 over 16 patches: 7, 7, 2 rows, split 4/3, 4/3, 1/1 over the ranks (uneven, weighted);
    # the AGC arm clips every bias as one unit spanning both ranks' shards
    flags = ["--arms", "hybrid_agc", "--stage-b-levels", "none", "--batch-size", "7"]
    code, text = run(SCRIPT, tmp_path / "run", "--fsdp", *flags)
    assert code == 0, text[-3000:]
    assert "Stage A: 1 runs (0 already done), 2 process(es)" in text
    sharded = json.loads((tmp_path / "run" / "runs" / "hybrid_agc_seed0.json").read_text())

    args = parse_args(["--smoke", *flags])
    (tmp_path / "one" / "runs").mkdir(parents=True)
    single = run_one(Job("A", "hybrid_agc", args.seed, args.levels), args, tmp_path / "one", torch.device("cpu"))
    assert sharded["grad_norm"]["steps"] == single["grad_norm"]["steps"] == 6  # 2 epochs x 3 batches
    for a, b in zip(sharded["curve"], single["curve"]):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert sharded["curve"][-1]["val_loss"] < sharded["init_val"] - 1e-3  # it trained
    files = [p / "runs" / "hybrid_agc_seed0_model.safetensors" for p in (tmp_path / "run", tmp_path / "one")]
    weights = [load_file(f) for f in files]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[1]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=1e-5, msg=key)
