import contextlib
import itertools
import json
import os
import pickle
import random
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from blockyard.train.checkpoint import CheckpointManager, CorruptCheckpointWarning
from blockyard.train.early_stopping import EarlyStopping
from blockyard.train.ema import EMA
from blockyard.train.serialize import decode_state, encode_state, pack, pack_parts, unpack, unpack_file

HERE = Path(__file__).parent


@contextlib.contextmanager
def no_corruption_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)
        yield


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def trained_state(seed: int = 0, steps: int = 3) -> dict:
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # holds inf in its state
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ema = EMA(model, decay=0.9)
    stopper = EarlyStopping(patience=3)
    for step in range(1, steps + 1):
        loss = model(torch.randn(6, 4)).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update(model, step)
        stopper.step(loss.item())
    gen = torch.Generator().manual_seed(seed + 7)
    torch.rand(5, generator=gen)
    npgen = np.random.default_rng(seed)
    npgen.random(3)
    return {"model": model, "optimizer": opt, "sched": sched, "plateau": plateau, "scaler": scaler,
            "ema": ema, "stopper": stopper, "gen": gen, "npgen": npgen}


def assert_same(a, b, path="state"):
    """Exact (bitwise for tensors, type-preserving for containers) equality."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def snapshot(state: dict) -> dict:
    out = {}
    for name, obj in state.items():
        if isinstance(obj, torch.Generator):
            out[name] = obj.get_state()
        elif isinstance(obj, np.random.Generator):
            out[name] = obj.bit_generator.state
        else:
            out[name] = obj.state_dict()
    return out


def test_round_trip_restores_every_object_and_rng_exactly(tmp_path):
    state = trained_state(0)
    values = {"epoch": 3, "position": (2, 17), "best": float("inf"), "ids": {1: "a", 2: "b"},
              "arr": np.arange(4, dtype=np.int16), "tok": torch.tensor([1, 2], dtype=torch.int64)}
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(3, {**state, **values}, metric=0.25)
    before = snapshot(state)
    expected_draws = (torch.rand(4), np.random.rand(3), random.random())  # noqa: NPY002

    fresh = trained_state(1, steps=2)  # different weights, moments, counters and generator states
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    resumed = manager.load_latest(fresh)
    got_draws = (torch.rand(4), np.random.rand(3), random.random())  # noqa: NPY002

    assert_same(snapshot(fresh), before)
    assert resumed["step"] == 3 and resumed["metric"] == 0.25
    for key, value in values.items():
        assert_same(resumed[key], value, key)
    assert_same(got_draws, expected_draws)  # global torch, numpy and python RNGs continue exactly
    assert torch.equal(torch.rand(3, generator=fresh["gen"]), torch.rand(3, generator=state["gen"]))


def test_nothing_to_resume_returns_none(tmp_path):
    assert CheckpointManager(tmp_path / "absent").load_latest({"model": make_model()}) is None
    assert CheckpointManager(tmp_path).load_latest({"model": make_model()}) is None
    assert CheckpointManager(tmp_path).load_best({"model": make_model()}) is None


def test_encoding_keeps_sharing_bf16_scalars_and_views():
    base = torch.randn(6, 4)
    shared = torch.randn(3, dtype=torch.bfloat16)
    obj = {"state": {0: {"a": shared, "b": shared, "step": torch.tensor(7.0)},
                     1: {"view": base[2:4], "t": base.t(), "full": base}},
           "groups": [{"betas": (0.9, 0.999), "params": [0, 1], "lr": 1e-3, "nan": float("nan")}],
           "__tensor__": "not a tag", "dtype": torch.bfloat16, "np": np.float32(1.5)}
    tree, tensors = encode_state(obj)
    json.dumps(tree, allow_nan=False)  # strictly JSON
    back, _ = unpack(pack(obj))
    assert_same(back, obj)
    assert back["state"][0]["a"] is back["state"][0]["b"]  # one tensor stored once, shared again
    assert back["state"][0]["step"].shape == () and back["state"][0]["a"].dtype == torch.bfloat16
    assert tensors["state.1.view"].numel() == 8  # a view is stored alone, not with its base buffer
    assert_same(decode_state(tree, tensors), obj)


@pytest.mark.parametrize("fallback", [False, True])
def test_pack_parts_is_a_safetensors_file_and_the_streaming_reader_reads_it_back(fallback):
    # pack_parts lays out the tensors itself (views of them, no joined copy); unpack_file reads
    # each one straight into a fresh tensor while passing every byte to the hash
    import hashlib
    import io

    obj = {"w": torch.randn(5, 3), "d": torch.randn(2, dtype=torch.float64), "h": torch.randn(4).bfloat16(),
           "i": torch.arange(7, dtype=torch.int16), "b": torch.tensor([True, False, True]),
           "u": torch.tensor([3], dtype=torch.uint8), "empty": torch.zeros(0, 2), "scalar": torch.tensor(2.5),
           "np": np.arange(3, dtype=np.int32), "n": 4}
    if fallback:  # a dtype pack_parts leaves to safetensors: the old layout and the whole-blob reader
        obj["f8"] = torch.ones(3).to(torch.float8_e4m3fn)
    blob = pack(obj)
    assert b"".join(pack_parts(obj)) == blob
    _, tensors = encode_state(obj)
    stored = safetensors.torch.load(blob)  # an independent reader of the format
    assert sorted(stored) == sorted(tensors)
    for name, t in tensors.items():
        assert stored[name].dtype == t.dtype and torch.equal(stored[name].float(), t.float()), name
    seen = hashlib.sha256()
    f = io.BytesIO(blob)
    streamed = unpack_file(f, len(blob), seen.update)
    assert seen.hexdigest() == hashlib.sha256(blob).hexdigest() and f.tell() == len(blob)
    if fallback:
        assert streamed is None
        return
    back, _ = streamed
    assert_same(back, obj)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in back.values()
               if isinstance(t, torch.Tensor))  # each tensor owns its storage (no views of a shared buffer)
    with pytest.raises(ValueError, match=r"do not follow on|do not fit"):  # header and data disagree
        bad = bytearray(blob)
        n = int.from_bytes(bad[:8], "little")
        bad[8:8 + n] = bad[8:8 + n].replace(b'"shape":[5,3]', b'"shape":[5,4]')
        unpack_file(io.BytesIO(bytes(bad)), len(bad), lambda _: None)


def test_rejects_values_that_would_need_pickle(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match="opaque"):
        manager.save(1, {"model": make_model(), "opaque": object()})
    assert list(tmp_path.iterdir()) == []  # the temporary directory is removed too


def files_are_pickle_free(directory: Path) -> list[str]:
    names = []
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        data = path.read_bytes()
        names.append(path.name)
        assert not data.startswith(b"PK"), f"{path} is a zip (torch.save) archive"
        # Every byte is accounted for by a JSON document or by the safetensors layout
        # (8-byte header length, JSON header, raw tensor bytes): no room for a pickle stream.
        if path.suffix == ".json":
            json.loads(data)
            continue
        assert path.suffix == ".safetensors", path
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert not spans or spans[0][0] == 0, path
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), f"{path} has gaps between tensors"
        assert 8 + n + (spans[-1][1] if spans else 0) == len(data), f"{path} is not exactly a safetensors file"
        json.loads(header["__metadata__"]["blockyard.tree"])
    return names


def test_save_writes_only_json_and_safetensors_and_load_never_unpickles(tmp_path, monkeypatch):
    state = trained_state(0)
    manager = CheckpointManager(tmp_path)
    manager.save(3, {**state, "epoch": 1}, metric=1.0)
    names = files_are_pickle_free(tmp_path)
    assert "model.safetensors" in names and "manifest.json" in names and "_rng.safetensors" in names
    # the weights file is a plain safetensors file with the module's own keys
    assert set(safetensors.torch.load_file(tmp_path / "step_00000003" / "model.safetensors")) == set(
        state["model"].state_dict())

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, forbidden)
    fresh = trained_state(1, steps=2)
    assert manager.load_latest(fresh)["epoch"] == 1
    assert_same(snapshot(fresh), snapshot(state))


def save_steps(manager, steps, metrics=None, mode="min"):
    saved = {}
    for i, step in enumerate(steps):
        model = make_model()
        manager.save(step, {"model": model}, metric=None if metrics is None else metrics[i], mode=mode)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return saved


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-17])


@pytest.mark.parametrize("damage", [
    lambda d: flip_byte(d / "model.safetensors"),
    lambda d: truncate(d / "model.safetensors"),
    lambda d: (d / "_values.safetensors").unlink(),
    lambda d: flip_byte(d / "manifest.json"),
    lambda d: (d / "manifest.json").unlink(),
], ids=["flipped-byte", "truncated", "missing-file", "manifest-flipped", "manifest-missing"])
def test_corrupted_newest_is_named_and_skipped_for_previous(tmp_path, damage):
    manager = CheckpointManager(tmp_path, keep_last=3)
    saved = save_steps(manager, [10, 20])
    damage(tmp_path / "step_00000020")
    model = make_model()
    with pytest.warns(CorruptCheckpointWarning, match="step_00000020"):
        resumed = manager.load_latest({"model": model})
    assert resumed["step"] == 10
    assert_same(model.state_dict(), saved[10])


def test_all_corrupted_returns_none_and_touches_nothing(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [5])
    flip_byte(tmp_path / "step_00000005" / "model.safetensors")
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(CorruptCheckpointWarning, match="step_00000005"):
        assert manager.load_latest({"model": model}) is None
    assert_same(model.state_dict(), before)


def test_leftover_temp_dirs_are_ignored_and_removed(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    save_steps(manager, [1])
    leftover = tmp_path / ".tmp-step_00000002-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    with no_corruption_warning():
        assert manager.load_latest({"model": make_model()})["step"] == 1
    assert not leftover.exists()


def test_retention_keeps_last_every_and_best_and_never_touches_user_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step_final").mkdir()
    (tmp_path / "step_00000001.bak").write_text("mine too")
    manager = CheckpointManager(tmp_path, every=4, keep_last=2)
    metrics = [5.0, 3.0, 1.0, 4.0, 6.0, 2.0, 7.0]  # best (min) is step 3
    save_steps(manager, range(1, 8), metrics)
    assert manager.steps() == [3, 4, 6, 7]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "step_final").is_dir()
    assert (tmp_path / "step_00000001.bak").exists()

    manager_max = CheckpointManager(tmp_path / "max", keep_last=1)
    save_steps(manager_max, range(1, 5), [1.0, 9.0, float("nan"), 2.0], mode="max")
    assert manager_max.steps() == [2, 4]
    assert manager_max.load_best({"model": make_model()})["step"] == 2


def test_load_best_falls_back_to_next_best_intact(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    saved = save_steps(manager, [1, 2, 3], [0.5, 0.1, 0.3])
    flip_byte(tmp_path / "step_00000002" / "model.safetensors")
    model = make_model()
    with pytest.warns(CorruptCheckpointWarning, match="step_00000002"):
        assert manager.load_best({"model": model})["step"] == 3
    assert_same(model.state_dict(), saved[3])


def test_resaving_a_step_replaces_it_and_newer_abandoned_ones_survive(tmp_path):
    manager = CheckpointManager(tmp_path, every=10, keep_last=1)
    save_steps(manager, [10, 20])
    flip_byte(tmp_path / "step_00000020" / "model.safetensors")
    with pytest.warns(CorruptCheckpointWarning):
        assert manager.load_latest({"model": make_model()})["step"] == 10
    save_steps(manager, [15])  # resumed timeline: 20 (damaged, newer) is left for this run to overwrite
    assert manager.steps() == [10, 15, 20]
    saved = save_steps(manager, [20])
    model = make_model()
    with no_corruption_warning():
        assert manager.load_latest({"model": model})["step"] == 20
    assert_same(model.state_dict(), saved[20])
    assert manager.steps() == [10, 20]


class Wrapper(nn.Module):  # stands in for DDP: its state_dict keys start with "module."
    def __init__(self, inner):
        super().__init__()
        self.module = inner


class Holder(nn.Module):  # a compiled submodule gives keys like "net._orig_mod.0.weight"
    def __init__(self, net):
        super().__init__()
        self.net = net


@pytest.mark.parametrize("save_as, load_as", [
    (lambda m: Wrapper(m), lambda m: m),
    (lambda m: m, lambda m: Wrapper(m)),
    (lambda m: Holder(torch.compile(m)), lambda m: Holder(m)),
    (lambda m: Holder(m), lambda m: Holder(torch.compile(m))),
    (lambda m: torch.compile(m), lambda m: Wrapper(torch.compile(m))),
], ids=["module-to-bare", "bare-to-module", "orig_mod-to-bare", "bare-to-orig_mod", "compiled-to-ddp-compiled"])
def test_ddp_and_compile_prefixes_are_accepted_either_way(tmp_path, save_as, load_as):
    source, target = make_model(), make_model()
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"model": save_as(source)})
    manager.load_latest({"model": load_as(target)})
    assert_same(target.state_dict(), source.state_dict())


def test_real_ddp_wrapper_is_unwrapped_on_save(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        source, target = make_model(), make_model()
        manager = CheckpointManager(tmp_path / "ckpt")
        manager.save(1, {"model": nn.parallel.DistributedDataParallel(source)})
        keys = safetensors.torch.load_file(tmp_path / "ckpt" / "step_00000001" / "model.safetensors")
        assert set(keys) == set(source.state_dict())
        manager.load_latest({"model": nn.parallel.DistributedDataParallel(target)})
        assert_same(target.state_dict(), source.state_dict())
    finally:
        dist.destroy_process_group()


def test_non_main_process_writes_nothing(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", is_main=False)
    assert manager.save(1, {"model": make_model()}) is None
    assert not (tmp_path / "ckpt").exists()


def test_missing_entry_and_bad_arguments_raise(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [1])
    with pytest.raises(ValueError, match="no entries \\['ema'\\]"):
        manager.load_latest({"model": make_model(), "ema": EMA(make_model())})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="every"):
        CheckpointManager(tmp_path, every=0)
    for bad in ["_rng", "a/b", "step", ""]:
        with pytest.raises(ValueError, match="invalid entry name"):
            manager.save(2, {bad: 1})
    with pytest.raises(ValueError, match="mode"):
        manager.save(2, {"model": make_model()}, metric=1.0, mode="best")
    with pytest.raises(ValueError, match="step"):
        manager.save(-1, {"model": make_model()})


def test_position_is_an_epoch_or_a_step_and_keeps_the_on_disk_names(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = make_model()
    for epoch in (1, 2, 3):  # a loop that checkpoints once per epoch
        path = manager.save(epoch, {"model": model, "opt_step": 10 * epoch})
    assert path == tmp_path / "step_00000003"
    assert manager.save(position=4, state={"model": model}) == tmp_path / "step_00000004"
    assert manager.steps() == [3, 4]
    body = json.loads((tmp_path / "step_00000003" / "manifest.json").read_text())["body"]
    assert body["step"] == 3  # the manifest key stays "step", so older checkpoints keep loading
    with no_corruption_warning():
        assert manager.load_latest({"model": make_model()})["step"] == 4
    with pytest.raises(ValueError, match=r"position: expected an int >= 0 .*optimizer step or epoch.*got 2\.0"):
        manager.save(2.0, {"model": model})


# ------------------------------------------------------------------ kill-and-resume (subprocesses)
def start_script(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.Popen([sys.executable, str(HERE / "resume_script.py"), "--out", str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect_kill: bool = False) -> None:
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    if expect_kill:
        assert proc.returncode == -9, err  # died by SIGKILL, as injected
    else:
        assert proc.returncode == 0, err
        assert "CorruptCheckpointWarning" not in err  # a temp dir is not a corrupted checkpoint


def checkpoint_digests(out: Path) -> dict:
    """step -> {file: sha256} from every manifest: equal digests mean bitwise-equal state."""
    result = {}
    for d in sorted((out / "ckpt").iterdir()):
        body = json.loads((d / "manifest.json").read_text())["body"]
        result[d.name] = {k: v["sha256"] for k, v in body["files"].items()}
    return result


def load_final(out: Path):
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    CheckpointManager(out / "ckpt", rng=False).load_latest({"model": model, "optimizer": opt})
    return model.state_dict(), opt.state_dict()


@pytest.mark.slow
def test_sigkill_at_checkpoint_and_mid_save_then_resume_is_bitwise_identical(tmp_path):
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
    baseline = start_script(reference)  # 12 steps in one go, concurrently with the killed run
    # 1. SIGKILL right after the checkpoint of step 6 was saved
    finish(start_script(resumed, "--kill-after", "6"), expect_kill=True)
    assert sorted(p.name for p in (resumed / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]
    # 2. resume from 6, then SIGKILL while writing the checkpoint of step 9 (after its first file);
    #    the log now holds records 7..9 past the last complete checkpoint
    finish(start_script(resumed, "--kill-in-save", "9"), expect_kill=True)
    names = sorted(p.name for p in (resumed / "ckpt").iterdir())
    assert names[1:] == ["step_00000003", "step_00000006"] and len(names) == 3
    assert names[0].startswith(".tmp-step_00000009-")  # the half-written checkpoint never got a step_ name
    assert len(list((resumed / "ckpt" / names[0]).iterdir())) == 1
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 9
    # 3. resume from 6 again (skipping the half-written 9, dropping log records 7..9) and finish
    finish(start_script(resumed))
    finish(baseline)
    assert not any(p.name.startswith(".tmp") for p in (resumed / "ckpt").iterdir())
    # the loss sequence, every checkpoint kept (weights, AdamW moments, scheduler, EMA, early
    # stopping, generators, global RNGs) and the final parameters are bitwise identical
    assert (resumed / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert checkpoint_digests(resumed) == checkpoint_digests(reference)
    (m1, o1), (m2, o2) = load_final(resumed), load_final(reference)
    assert_same(m1, m2)
    assert_same(o1, o2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_each_rank_resumes_its_own_rng_streams(tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ddp_rng_script.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["saved"] and r1["saved"] is None  # only rank 0 writes
    assert r0["step"] == r1["step"] == 5 and r0["note"] == r1["note"] == "rank0"
    assert r0["got"] == r0["expected"] and r1["got"] == r1["expected"]
    assert r0["expected"] != r1["expected"]  # the ranks' streams differ, so each got its own back
    body = json.loads((tmp_path / "ckpt" / "step_00000005" / "manifest.json").read_text())["body"]
    assert body["rng_ranks"] == 2
