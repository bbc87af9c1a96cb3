import subprocess
import sys
import time

import pytest

from blockyard.data import file_lock

fcntl = pytest.importorskip("fcntl", reason="file_lock locks on POSIX only")

HOLD = """
import sys, time
from blockyard.data import file_lock
with file_lock(sys.argv[1]):
    open(sys.argv[2], "a").write("held\\n")
    time.sleep(1.0)
    open(sys.argv[2], "a").write("released\\n")
"""


def test_a_second_process_waits_for_the_lock(tmp_path):
    lock, log = tmp_path / "sub" / ".lock", tmp_path / "log.txt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(log)])
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "held" in log.read_text()):  # the other process holds it now
            assert time.monotonic() < deadline, "holder never took the lock"
            time.sleep(0.01)
        with file_lock(lock):
            assert log.read_text().splitlines() == ["held", "released"]  # we got it only after the release
    finally:
        holder.wait(timeout=30)
    assert lock.exists()  # parent folder created; the lock file stays (harmless, reusable)


def _free(lock):
    """Whether another open file description can take ``lock`` right now (flock locks conflict
    between separate open() calls, even in one process)."""
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_the_lock_can_be_taken_again_after_release(tmp_path):
    lock = tmp_path / ".lock"
    for _ in range(3):
        with file_lock(lock):
            assert not _free(lock)  # really held inside ...
        assert _free(lock)  # ... and released on exit
    with pytest.raises(KeyError, match="inside"):  # released when the body raises, too
        with file_lock(lock):
            raise KeyError("inside")
    assert _free(lock)
