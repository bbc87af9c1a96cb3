import json
import math

import numpy as np
import pytest
import torch

from blockyard.train.metrics_log import MetricsLog, read_metrics

AWKWARD = [0.1 + 0.2, 1 / 3, 5e-324, 1.7976931348623157e308, float(torch.tensor(0.1, dtype=torch.float32)),
           -0.0, 123456789.12345679]


def write_run(path, steps, resume_step=None, start=1):
    with MetricsLog(path, resume_step=resume_step) as log:
        for step in range(start, steps + 1):
            log.log(step, loss=AWKWARD[step % len(AWKWARD)] * step, epoch=step // 4)


def test_floats_round_trip_bit_exactly(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl") as log:
        for i, value in enumerate(AWKWARD):
            log.log(i, value=value)
    back = [r["value"] for r in read_metrics(tmp_path / "m.jsonl")]
    assert [v.hex() for v in back] == [v.hex() for v in AWKWARD]


def test_resumed_log_equals_uninterrupted_one(tmp_path):
    write_run(tmp_path / "full.jsonl", 10)
    path = tmp_path / "resumed.jsonl"
    write_run(path, 9)  # the crashed run got to step 9 ...
    with open(path, "a") as f:
        f.write('{"step": 10, "lo')  # ... and died half-way through writing step 10
    write_run(path, 10, resume_step=6, start=7)  # its last checkpoint was step 6
    assert path.read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_truncate_after_drops_later_records_and_keeps_appending(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 6):
        log.log(step, loss=float(step))
    log.truncate_after(2)
    log.log(3, loss=30.0)
    assert [(r["step"], r["loss"]) for r in log.read()] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    log.close()


def test_fresh_run_replaces_a_stale_file(tmp_path):
    path = tmp_path / "m.jsonl"
    write_run(path, 5)
    write_run(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_records_are_flushed_as_they_are_written(tmp_path):
    log = MetricsLog(tmp_path / "sub" / "m.jsonl")
    log.log(1, loss=0.5)
    assert (tmp_path / "sub" / "m.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'  # before close()
    log.close()


def test_tensors_numpy_and_non_finite_values(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl") as log:
        log.log(1, loss=torch.tensor(0.25), per_class=torch.tensor([1.0, 2.0]), n=np.int64(3),
                acc=np.float32(0.5), bad=float("nan"), inf=float("inf"), tag="train")
    (rec,) = read_metrics(tmp_path / "m.jsonl")
    assert rec["loss"] == 0.25 and rec["per_class"] == [1.0, 2.0] and rec["n"] == 3 and rec["acc"] == 0.5
    assert math.isnan(rec["bad"]) and rec["inf"] == math.inf and rec["tag"] == "train"


def test_non_main_rank_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", is_main=False)
    log.log(1, loss=1.0)
    log.close()
    assert not (tmp_path / "m.jsonl").exists()


def test_rejects_bad_input(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    with pytest.raises(TypeError, match="step"):
        log.log(1.0, loss=1.0)
    with pytest.raises(ValueError, match="step"):
        log.log(1, step=2)
    with pytest.raises(TypeError, match="thing"):
        log.log(1, thing=object())
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log(2, loss=1.0)
    with pytest.raises(TypeError, match="resume_step"):
        MetricsLog(tmp_path / "x.jsonl", resume_step=2.5)
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == []
