"""Make ``examples/`` importable (``import fusion.env``) and the test helpers next to this file."""
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
for path in (_HERE.parents[1] / "examples", _HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: the examples' tests use tiny batches, and on a busy
    2-core machine each parallel region waits for a descheduled thread (100x slower forwards
    were measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
