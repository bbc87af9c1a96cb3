"""RunDir: a run folder that is locked, never silently reused, resumed only as it was started."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from blockyard.train import (
    RunDir,
    RunFolderError,
    add_common_args,
    gather_rows,
    per_rank_batch,
    predict_rows,
    run_config,
    shard_rows,
)

HERE = Path(__file__).parent


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def finished_run(path: Path, config=None) -> nn.Module:
    """A finished run: run.json, two checkpoints, a metrics log, a summary and a plot."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    run = RunDir(path, config or {"width": 8, "lr": 0.1})
    ckpt = run.checkpoints(keep_last=2)
    log = run.metrics_log("metrics.jsonl", None, key="epoch")
    for epoch in (1, 2):
        log.log(epoch, loss=1.0 / epoch)
        ckpt.save(epoch, {"model": model, "epoch": epoch})
    log.close()
    run.file("plot.png").write_bytes(b"png")
    run.write_json("summary.json", {"loss": 0.5})
    run.finish()
    return model


def test_fresh_run_records_its_config_files_and_status(tmp_path):
    finished_run(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"] == {"width": 8, "lr": 0.1}
    assert record["status"] == "finished"
    assert set(record["files"]) == {"metrics.jsonl", "plot.png", "summary.json"}
    assert record["checkpoints"] == ["checkpoints"]


def test_a_used_folder_is_refused_and_left_byte_identical(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(RunFolderError, match=r"holds an earlier run.*--resume auto.*--overwrite"):
        RunDir(out, {"width": 8, "lr": 0.1})
    assert snapshot(out) == before


def test_resume_with_a_changed_config_names_the_keys_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    before = snapshot(out)
    with pytest.raises(RunFolderError, match=r"depth: saved \(absent\), requested 2; width: saved 8, requested 16"):
        RunDir(out, {"width": 16, "lr": 0.1, "depth": 2}, resume="auto")
    assert snapshot(out) == before


def test_resume_continues_and_loads_the_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    saved = finished_run(out)
    run = RunDir(out, {"lr": 0.1, "width": 8}, resume="auto")  # key order does not matter
    assert run.resumed
    model = nn.Linear(3, 2)
    loaded = run.resume_from(run.checkpoints(), {"model": model})
    assert loaded["epoch"] == 2 and torch.equal(model.weight, saved.weight)
    log = run.metrics_log("metrics.jsonl", {"epoch": 1}, key="epoch")
    assert [r["step"] for r in log.read()] == [1]  # records after the resumed epoch are dropped
    log.close()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running" and len(record["resumed"]) == 1
    run.close()


def test_resume_from_a_named_checkpoint_moves_the_abandoned_newer_ones_aside(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    newer = snapshot(out / "checkpoints" / "step_00000002")
    run = RunDir(out, {"width": 8, "lr": 0.1}, resume=str(out / "checkpoints" / "step_00000001"))
    ckpt = run.checkpoints()
    assert run.resume_from(ckpt, {"model": nn.Linear(3, 2)})["epoch"] == 1
    assert ckpt.steps() == [1]  # a later --resume auto cannot pick up the abandoned step 2
    assert snapshot(run.moved_to / "step_00000002") == newer  # moved, not deleted
    run.close()
    with pytest.raises(RunFolderError, match="not an intact checkpoint"):
        RunDir(out, {"width": 8, "lr": 0.1}, resume=str(out / "checkpoints" / "step_00000009"))


def test_resume_from_a_checkpoint_of_an_earlier_stage_is_refused(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, {"a": 1})
    for stage in ("pretrain", "finetune"):
        run.checkpoints(f"{stage}/checkpoints").save(1, {"model": nn.Linear(2, 2)})
    run.close()
    before = snapshot(out)
    with pytest.raises(RunFolderError, match="last started stage"):
        RunDir(out, {"a": 1}, resume=str(out / "pretrain" / "checkpoints" / "step_00000001"))
    assert snapshot(out) == before


def test_resume_auto_on_a_fresh_folder_starts_a_new_run(tmp_path):
    run = RunDir(tmp_path / "new", {"a": 1}, resume="auto")
    assert not run.resumed
    assert run.resume_from(run.checkpoints(), {"model": nn.Linear(3, 2)}) is None
    run.close()
    with pytest.raises(RunFolderError, match="holds no earlier run"):
        RunDir(tmp_path / "other", {"a": 1}, resume=str(tmp_path / "x" / "step_00000001"))


def test_damaged_checkpoints_are_named_instead_of_starting_over(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    for f in (out / "checkpoints").rglob("model.safetensors"):
        f.write_bytes(f.read_bytes()[:-17])
    before = snapshot(out)
    with pytest.raises(RunFolderError, match=r"every checkpoint.*damaged.*step_00000001.*step_00000002"):
        RunDir(out, {"width": 8, "lr": 0.1}, resume="auto")
    assert snapshot(out) == before


def test_one_intact_checkpoint_is_enough_to_resume(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    f = out / "checkpoints" / "step_00000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-17])
    run = RunDir(out, {"width": 8, "lr": 0.1}, resume="auto")
    with pytest.warns(UserWarning, match="step_00000002"):
        assert run.resume_from(run.checkpoints(), {"model": nn.Linear(3, 2)})["epoch"] == 1
    run.close()


def test_overwrite_moves_only_the_runs_files_aside(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "x.bin").write_bytes(b"cache")
    before = snapshot(out)
    run = RunDir(out, {"width": 32}, overwrite=True)
    assert run.moved_to is not None and run.moved_to.parent == out / "previous"
    moved = snapshot(run.moved_to)
    for name, digest in before.items():
        where = moved if name not in ("notes.txt", "data/x.bin") else snapshot(out)
        assert where[name] == digest, name
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
    assert json.loads((out / "run.json").read_text())["config"] == {"width": 32}
    run.close()
    run = RunDir(out, {"width": 64}, overwrite=True)  # a second overwrite gets its own folder
    assert len(list((out / "previous").iterdir())) == 2
    run.close()


def test_a_folder_of_an_older_blockyard_is_recognised(tmp_path):
    out = tmp_path / "legacy"
    (out / "stage" / "checkpoints").mkdir(parents=True)
    (out / "stage" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match="holds an earlier run"):
        RunDir(out, {"a": 1})
    with pytest.raises(RunFolderError, match="older blockyard"):
        RunDir(out, {"a": 1}, resume="auto")
    run = RunDir(out, {"a": 1}, overwrite=True)
    assert (run.moved_to / "stage" / "metrics.jsonl").exists()
    run.close()


def test_a_second_process_fails_fast_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, {"a": 1})
    code = f"from blockyard.train import RunDir\nRunDir({str(out)!r}, {{'a': 1}}, resume='auto')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"in use by another run (pid {os.getpid()}" in proc.stderr
    run.close()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # released: the same run can be resumed


def test_a_users_file_named_like_a_checkpoint_is_never_touched(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, {"a": 1})
    ckpt = run.checkpoints(keep_last=1)
    user_file = out / "checkpoints" / "step_00000003"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("mine")
    user_dir = out / "checkpoints" / "step_00000001"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine too")
    with pytest.raises(Exception, match="is not a checkpoint"):
        ckpt.save(3, {"model": nn.Linear(2, 2)})
    ckpt.save(2, {"model": nn.Linear(2, 2)})
    ckpt.save(4, {"model": nn.Linear(2, 2)})  # retention drops step 2, never the user's step_00000001
    assert user_file.read_text() == "mine" and (user_dir / "notes.txt").read_text() == "mine too"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000003",
                                                                        "step_00000004"]
    run.close()


def test_bad_arguments(tmp_path):
    with pytest.raises(RunFolderError, match="--resume and --overwrite"):
        RunDir(tmp_path / "a", {}, resume="auto", overwrite=True)
    with pytest.raises(TypeError, match="config: expected"):
        RunDir(tmp_path / "b", [1, 2])
    with pytest.raises(TypeError, match="config: expected JSON"):
        RunDir(tmp_path / "c", {"x": object()})
    run = RunDir(tmp_path / "d", {})
    with pytest.raises(ValueError, match="reserved"):
        run.file("run.json")
    run.close()


def test_common_args_have_one_meaning_and_run_config_drops_control_flags():
    p = add_common_args(argparse.ArgumentParser(), out="runs/x", epochs=3, batch_size=64, lr=1e-3, precision="bf16")
    p.add_argument("--widths", default="8,8")
    args = p.parse_args(["--resume", "auto", "--seed", "2"])
    assert (args.out, args.epochs, args.batch_size, args.lr, args.precision, args.seed) == \
        ("runs/x", 3, 64, 1e-3, "bf16", 2)
    assert args.resume == "auto" and not args.overwrite and not args.smoke and args.kill_at_step is None
    config = run_config(args)
    assert "out" not in config and "resume" not in config and "overwrite" not in config
    assert config["widths"] == "8,8" and config["seed"] == 2
    assert "widths" not in run_config(args, ignore=("widths",))
    with pytest.raises(SystemExit, match=r"^2$"):
        p.parse_args(["--precision", "fp8"])
    assert "global batch" in p.format_help()
    assert "--fsdp" not in p.format_help()  # only where an example implements it
    sharded = add_common_args(argparse.ArgumentParser(), out="runs/x", fsdp=True).parse_args(["--fsdp"])
    assert sharded.fsdp and run_config(sharded)["fsdp"]  # kept on resume, checked like the architecture


def test_per_rank_batch_divides_or_says_why():
    assert per_rank_batch(64, 2) == 32
    with pytest.raises(ValueError, match="--batch-size: the global batch 63 does not divide over 2"):
        per_rank_batch(63, 2)
    with pytest.raises(ValueError, match="--batch-size: expected a positive int"):
        per_rank_batch(0, 1)


def test_predict_rows_single_process_equals_the_full_batch():
    x = torch.randn(13, 4)
    out = predict_rows(lambda rows: x[rows] * 2, 13, batch_size=5)
    assert torch.equal(out, x * 2)
    assert torch.equal(shard_rows(3), torch.arange(3))
    with pytest.raises(ValueError, match="local: expected 3 rows"):
        gather_rows(torch.zeros(2, 1), 3)


@pytest.mark.distributed
def test_two_processes(tmp_path):
    """gather_rows in row order with an uneven split; a refusal by rank 0 is raised on both ranks."""
    out = tmp_path / "used"
    finished_run(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "run_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["gathered"] == [[float(i), float(i) * 10] for i in range(5)]
        assert result["shard"] == ([0, 2, 4] if rank == 0 else [1, 3, 0])
        assert "earlier run" in result["refused"] if rank == 0 else "main process refused" in result["refused"]
        assert result["resumed"] is True
