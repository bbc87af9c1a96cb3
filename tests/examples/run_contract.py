"""The run contract, checked the same way for every example (each example's test file calls these).

Every check launches the example as a user would (torchrun, 2 gloo processes, ``--smoke``) on a
folder that already holds a finished smoke run, and asserts what the README promises: a refused
launch exits non-zero and leaves every file of the earlier run byte-identical.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from torchrun_helpers import read_metrics

LOCK = ".lock"


def launch(script: Path, out: Path, *extra: str, nproc: int = 2, smoke: bool = True) -> subprocess.Popen:
    """Start ``torchrun ... script [--smoke] --out out *extra`` in its own session (killable as a group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *(["--smoke"] if smoke else []), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``proc``; its exit code and stdout + stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s\n{out[-3000:]}\n{err[-3000:]}") from None
    return proc.returncode, out + err


def run(script: Path, out: Path, *extra: str, nproc: int = 2, timeout: float = 300) -> tuple[int, str]:
    return finish(launch(script, out, *extra, nproc=nproc), timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (the lock file aside: it holds a pid)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != LOCK:
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_refused(script: Path, out: Path, *extra: str, match: str, nproc: int = 2) -> str:
    """A launch on the used ``out`` exits non-zero, says ``match``, and changes no file."""
    before = snapshot(out)
    code, text = run(script, out, *extra, nproc=nproc)
    assert code != 0, f"expected a refusal, got exit 0\n{text[-3000:]}"
    assert match in text, f"expected {match!r} in the output\n{text[-3000:]}"
    assert snapshot(out) == before, "a refused launch changed files of the earlier run"
    return text


def check_used_out_is_refused(script: Path, out: Path, *extra: str) -> None:
    """Second run without --resume/--overwrite: refused, earlier run byte-identical."""
    assert_refused(script, out, *extra, match="holds an earlier run")


def check_changed_config_is_refused(script: Path, out: Path, *flag: str, key: str) -> None:
    """``--resume auto`` with a changed architecture flag: refused naming ``key``, nothing changed."""
    assert_refused(script, out, "--resume", "auto", *flag, match=key)


def check_damaged_checkpoints_are_refused(script: Path, out: Path, *extra: str) -> None:
    """Every checkpoint truncated + ``--resume auto``: refused naming them, nothing changed."""
    damaged = 0
    for manifest in out.rglob("manifest.json"):
        for f in manifest.parent.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:-17])
            damaged += 1
    assert damaged, f"no checkpoint found under {out}"
    assert_refused(script, out, "--resume", "auto", *extra, match="damaged")


def check_overwrite_keeps_the_old_run(script: Path, out: Path, *extra: str) -> None:
    """``--overwrite`` moves the earlier run into OUT/previous/<stamp>/ byte-identical, and starts anew."""
    before = snapshot(out)
    code, text = run(script, out, "--overwrite", *extra)
    assert code == 0, text[-3000:]
    aside = [p for p in (out / "previous").iterdir()]
    assert len(aside) == 1, aside
    moved = snapshot(aside[0])
    kept_in_place = {k: v for k, v in before.items() if (out / k).exists() and not k.startswith("previous/")}
    for name, digest in before.items():
        assert moved.get(name) == digest or kept_in_place.get(name) == digest, f"{name} of the earlier run is lost"
    assert (out / "run.json").exists() and (out / "summary.json").exists()


def check_concurrent_runs(script: Path, out: Path, *extra: str) -> None:
    """Two runs started at once on a fresh ``out``: one fails fast naming the folder, the other finishes."""
    procs = [launch(script, out, *extra) for _ in range(2)]
    results = [finish(p) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [(c, t[-2000:]) for c, t in results]
    loser = next(t for c, t in results if c != 0)
    assert "in use by another run" in loser or "holds an earlier run" in loser, loser[-3000:]
    assert (out / "summary.json").exists()


def check_sigkill_resume_is_exact(script: Path, out: Path, reference: Path, metrics: list[str], kill_at: int,
                                  *extra: str) -> None:
    """SIGKILL at optimizer step ``kill_at`` then ``--resume auto`` == an uninterrupted run in ``reference``.

    ``metrics``: the metrics.jsonl files (relative paths) to compare, timing fields excluded.
    """
    code, text = run(script, out, "--kill-at-step", str(kill_at), *extra)
    assert code != 0, f"the run was not killed (kill-at-step {kill_at} never reached?)\n{text[-3000:]}"
    assert not (out / "summary.json").exists()
    code, text = run(script, out, "--resume", "auto", *extra)
    assert code == 0, text[-3000:]
    for name in metrics:
        assert read_metrics(out / name) == read_metrics(reference / name), name


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)
