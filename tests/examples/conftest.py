"""Make ``examples/`` importable (``import fusion.env``) and the test helpers next to this file."""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for path in (_HERE.parents[1] / "examples", _HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
