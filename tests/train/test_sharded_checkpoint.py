"""Sharded checkpoints (CheckpointManager(sharded=True)) and FSDP2 training on 2 gloo processes.

One launch of 2 processes (sharded_worker.py) runs every 2-process scenario and ends killed by
SIGKILL in the middle of a save; the single-process runs (the references, the 1-process legs of
the world-size changes) run here. The tests compare what each side wrote.
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import sharded_worker as run
import torch
from torch import nn

from blockyard.train import CheckpointError, CheckpointManager, CorruptCheckpointWarning, export_weights
from blockyard.train.sharded_checkpoint import SHARDS

HERE = Path(__file__).parent
LAUNCH_TIMEOUT_S = 240
ATOL = 1e-6  # as the DDP test: float rounding of a sum split over the ranks, after 9 steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The uninterrupted single-process run (3 epochs), which also writes the 1-process checkpoint ck1."""
    out = tmp_path_factory.mktemp("sharded")
    state = run.build()  # shard_model without a process group: the plain model
    run.train(state, range(1))
    epoch1 = run.snapshot(state)
    CheckpointManager(out / "ck1", sharded=True).save(1, {**state, "epoch": 1})
    run.train(state, range(1, run.EPOCHS))
    return {"out": out, "epoch1": epoch1, "final": run.snapshot(state)}


@pytest.fixture(scope="module")
def ranks(single) -> list[dict]:
    out, port = single["out"], _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "sharded_worker.py"), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    # both die by the SIGKILL the last scenario injects mid-save; anything else is a failure
    assert [p.returncode for p in procs] == [-9, -9], "\n".join(o[-3000:] for o in outs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def snap(single: dict, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(single["out"] / f"{name}.safetensors")


def assert_close(got: dict, want: dict, atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.fixture
def no_unpickling(monkeypatch):
    import torch._dynamo

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, forbidden)


# ------------------------------------------------------------------------------- two processes
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_training_with_accumulation_equals_single_process_global_batch(single, ranks):
    fsdp = snap(single, "uninterrupted2")
    assert_close(fsdp, single["final"])  # weights, EMA, AdamW moments, lr, step counters
    assert fsdp["steps"].tolist() == [9, 9, 9]  # 3 epochs x groups (2, 2, 1)
    start = run.snapshot(run.build())
    assert max((single["final"][k] - start[k]).abs().max().item() for k in start if k.startswith("model.")) > 0.05
    for res in ranks:
        assert res["fsdp_blocks"] == ["Linear", "FSDPBlock", "FSDPBlock", "Linear"]
    # parameters (so gradients and AdamW moments) per rank: 92 and 63 of 155, about 1/world each
    assert [r["local_numel"] for r in ranks] == [92, 63] and ranks[0]["full_numel"] == 155


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_2_to_1_reshards_exactly_and_continues_like_an_uninterrupted_single_process(
        single, ranks, no_unpickling):
    state = run.build()  # one process: a plain model
    resumed = CheckpointManager(single["out"] / "ck2").load(single["out"] / "ck2" / "step_00000001", state)
    assert resumed["step"] == 1 and resumed["epoch"] == 1
    assert_equal(run.snapshot(state), snap(single, "epoch1"))  # the 2-rank shards, reassembled bit for bit
    run.train(state, range(1, run.EPOCHS))
    assert_close(run.snapshot(state), single["final"])


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_1_to_2_reshards_exactly_and_continues_like_an_uninterrupted_two_process_run(single, ranks):
    for res in ranks:
        assert res["resumed_1to2"] == {"step": 1, "epoch": 1}
    assert_equal(snap(single, "after_load_1to2"), single["epoch1"])
    assert_close(snap(single, "resumed_1to2"), snap(single, "uninterrupted2"))


@pytest.mark.slow
@pytest.mark.distributed
def test_corrupted_shard_is_named_and_skipped_for_the_newest_intact_on_every_rank(single, ranks):
    for res in ranks:
        assert res["corrupt"]["step"] == 2
        assert len(res["corrupt"]["warnings"]) == 1
        message = res["corrupt"]["warnings"][0]
        assert "step_00000003" in message and "shards/shard-00002-model-00001-of-00001.safetensors" in message
        assert "sha256" in message
    assert_equal(snap(single, "loaded_corrupt"), snap(single, "epoch2"))
    # every rank got its own RNG streams back (they differ between the ranks)
    for res in ranks:
        assert res["draws_after_load_2"] == res["draws_after_save_2"]
    assert ranks[0]["draws_after_save_2"] != ranks[1]["draws_after_save_2"]
    # a resume at the same world size continues bit for bit
    assert_equal(snap(single, "after_gathered"), snap(single, "uninterrupted2"))


@pytest.mark.slow
@pytest.mark.distributed
def test_gathered_lets_ranks_run_different_numbers_of_forwards_without_waiting(single, ranks):
    net = run.make_model()
    net.load_state_dict({k[len("model."):]: v for k, v in snap(single, "epoch2").items() if k.startswith("model.")})
    expected = net(run.data()[0][0, 0]).detach()
    torch.testing.assert_close(torch.tensor(ranks[0]["gathered_out"]), expected, rtol=0, atol=1e-6)
    assert ranks[1]["gathered_out"] is None  # rank 1 ran no forward while rank 0 ran two


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_during_a_sharded_save_leaves_the_previous_checkpoint_loadable(single, ranks):
    folder = single["out"] / "ckkill"
    names = sorted(p.name for p in folder.iterdir())
    assert names[1:] == ["step_00000001"] and names[0].startswith(".tmp-step_00000002-")
    half = folder / names[0]  # both ranks' shards and RNG files are there, but no manifest: never published
    assert sorted(p.name for p in half.iterdir()) == ["_rng-rank00000.safetensors", "_rng-rank00001.safetensors",
                                                      SHARDS]
    assert len(list((half / SHARDS).iterdir())) == 2
    state = run.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)  # a temporary directory is not a checkpoint
        resumed = CheckpointManager(folder).load_latest(state)
    assert resumed["step"] == 1 and resumed["epoch"] == 1
    assert_equal(run.snapshot(state), snap(single, "kill_ref"))
    assert not half.exists()  # the leftover is removed by the next load


def file_is_json_or_exactly_safetensors(path: Path) -> None:
    data = path.read_bytes()
    assert not data.startswith(b"PK"), f"{path} is a zip (torch.save) archive"
    if path.suffix == ".json":
        json.loads(data)
        return
    assert path.suffix == ".safetensors", path
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert not spans or spans[0][0] == 0, path
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), f"{path} has gaps between tensors"
    assert 8 + n + (spans[-1][1] if spans else 0) == len(data), f"{path} is not exactly a safetensors file"


@pytest.mark.slow
@pytest.mark.distributed
def test_no_file_written_is_a_pickle_and_export_needs_no_unpickling(single, ranks, tmp_path, no_unpickling):
    files = [p for folder in ("ck1", "ck2") for p in (single["out"] / folder).rglob("*") if p.is_file()]
    assert len(files) == 3 * 6 + 4  # ck2: 3 checkpoints x (2 shards, 2 RNG, values, manifest); ck1: 4 files
    for path in files:
        file_is_json_or_exactly_safetensors(path)
    exported = export_weights(single["out"] / "ck2" / "step_00000002", tmp_path / "model.safetensors")
    weights = safetensors.torch.load_file(exported)
    want = {k[len("model."):]: v for k, v in snap(single, "epoch2").items() if k.startswith("model.")}
    assert_equal(weights, want)
    ema = safetensors.torch.load_file(export_weights(single["out"] / "ck2" / "step_00000002", tmp_path / "e.st",
                                                     entry="ema"))
    assert_equal(ema, {k[len("ema."):]: v for k, v in snap(single, "epoch2").items() if k.startswith("ema.")})
    net = run.make_model()
    net.load_state_dict(weights)  # the file is a plain state dict


# ------------------------------------------------------------------------------- one process
def test_single_process_round_trip_of_every_kind_of_entry_and_rng(tmp_path, no_unpickling):
    state = run.build()
    run.train(state, range(1))
    gen = torch.Generator().manual_seed(3)
    npgen = np.random.default_rng(4)
    values = {"epoch": 1, "pos": (2, 7), "arr": np.arange(3, dtype=np.int16), "tok": torch.tensor([5, 6])}
    manager = CheckpointManager(tmp_path, sharded=True)
    manager.save(3, {**state, "gen": gen, "npgen": npgen, **values}, metric=0.5)
    expected = run.snapshot(state), gen.get_state(), npgen.bit_generator.state, torch.rand(4)
    fresh = run.build()
    fresh_gen, fresh_np = torch.Generator().manual_seed(9), np.random.default_rng(9)
    torch.manual_seed(123)
    resumed = manager.load_latest({**fresh, "gen": fresh_gen, "npgen": fresh_np})
    assert_equal(run.snapshot(fresh), expected[0])
    assert torch.equal(fresh_gen.get_state(), expected[1]) and fresh_np.bit_generator.state == expected[2]
    assert torch.equal(torch.rand(4), expected[3])  # the global RNG continues exactly
    assert resumed["step"] == 3 and resumed["metric"] == 0.5 and resumed["pos"] == (2, 7)
    assert np.array_equal(resumed["arr"], values["arr"]) and torch.equal(resumed["tok"], values["tok"])
    body = json.loads((tmp_path / "step_00000003" / "manifest.json").read_text())["body"]
    assert body["layout"] == "sharded" and body["world_size"] == 1 and body["entries"]["optimizer"] == "optimizer"


def test_saving_before_the_first_step_leaves_training_unchanged(tmp_path):
    saved, plain = run.build(), run.build()
    CheckpointManager(tmp_path, sharded=True).save(0, saved)  # must not initialise AdamW's state
    assert not saved["optimizer"].state
    for state in (saved, plain):
        run.train(state, range(1))
    assert_equal(run.snapshot(saved), run.snapshot(plain))
    loaded = run.build()
    CheckpointManager(tmp_path).load_latest(loaded)
    run.train(loaded, range(1))
    assert_equal(run.snapshot(loaded), run.snapshot(plain))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x08
    path.write_bytes(bytes(data))


SHARD = f"{SHARDS}/shard-00001-model-00001-of-00001.safetensors"


@pytest.mark.parametrize("damage, named", [
    (lambda d: _flip(d / SHARD), SHARD),
    (lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:-9]), SHARD),
    (lambda d: (d / "_rng-rank00000.safetensors").unlink(), "_rng-rank00000.safetensors"),
    (lambda d: _flip(d / "_values.safetensors"), "_values.safetensors"),
    (lambda d: _flip(d / "manifest.json"), "manifest.json"),
], ids=["flipped-shard", "truncated-shard", "missing-rng", "flipped-values", "flipped-manifest"])
def test_corrupted_file_is_named_and_skipped_for_the_previous_checkpoint(tmp_path, damage, named):
    state = run.build()
    manager = CheckpointManager(tmp_path, keep_last=3, sharded=True)
    run.train(state, range(1))
    manager.save(1, state)
    expected = run.snapshot(state)
    run.train(state, range(1, 2))
    manager.save(2, state)
    damage(tmp_path / "step_00000002")
    fresh = run.build()
    with pytest.warns(CorruptCheckpointWarning, match=f"step_00000002.*{named}"):
        assert manager.load_latest(fresh)["step"] == 1
    assert_equal(run.snapshot(fresh), expected)
    with pytest.raises(CheckpointError, match=named):
        export_weights(tmp_path / "step_00000002", tmp_path / "w.safetensors")


def test_retention_and_load_best_work_on_sharded_checkpoints(tmp_path):
    state = run.build()
    manager = CheckpointManager(tmp_path, keep_last=2, every=3, sharded=True)
    for step, metric in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0]):
        manager.save(step, state, metric=metric)
    assert manager.steps() == [2, 3, 4, 5]  # best (2), every 3rd (3), last two (4, 5)
    assert manager.load_best(run.build())["step"] == 2


def test_optimizer_without_its_model_and_missing_storage_raise(tmp_path, monkeypatch):
    state = run.build()
    manager = CheckpointManager(tmp_path, sharded=True)
    manager.save(1, state)
    with pytest.raises(ValueError, match=r"optimizer 'optimizer' was saved by the parameter names of module entry "
                                         r"'model'; pass the module"):
        manager.load_latest({"optimizer": run.build()["optimizer"]})
    import torch.distributed.checkpoint as dcp

    class OldWriter:  # torch < 2.8: no save_distributed
        def __init__(self, path: str) -> None: ...

    monkeypatch.setattr(dcp, "HuggingFaceStorageWriter", OldWriter)
    with pytest.raises(ImportError, match=r"torch >= 2\.8"):
        manager.save(2, state)
    assert manager.steps() == [1]


def test_unsharded_manager_loads_sharded_and_plain_checkpoints_alike(tmp_path):
    state = run.build()
    run.train(state, range(1))
    CheckpointManager(tmp_path / "a", sharded=True).save(1, state)
    CheckpointManager(tmp_path / "b").save(1, state)
    for folder in ("a", "b"):
        fresh = run.build()
        CheckpointManager(tmp_path / folder).load_latest(fresh)
        assert_equal(run.snapshot(fresh), run.snapshot(state))
    exported = [safetensors.torch.load_file(export_weights(tmp_path / f / "step_00000001", tmp_path / f"{f}.st"))
                for f in ("a", "b")]
    assert_equal(exported[0], exported[1])
    with pytest.raises(ValueError, match="entry: expected a module entry"):
        export_weights(tmp_path / "a" / "step_00000001", tmp_path / "x.st", entry="stepper")


def test_plain_module_is_unchanged_by_a_sharded_manager_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    CheckpointManager(tmp_path, sharded=True, rng=False).save(0, {"model": model})
    target = nn.Linear(3, 2)
    CheckpointManager(tmp_path).load_latest({"model": target})
    assert torch.equal(target.weight, model.weight) and torch.equal(target.bias, model.bias)
    assert not any(p.name.startswith("_rng") for p in (tmp_path / "step_00000000").iterdir())
