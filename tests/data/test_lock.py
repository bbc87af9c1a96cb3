import subprocess
import sys
import time

from blockyard.data import file_lock

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


def test_the_lock_can_be_taken_again_after_release(tmp_path):
    for _ in range(3):
        with file_lock(tmp_path / ".lock"):
            pass
