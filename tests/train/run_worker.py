"""Two-process scenarios of tests/train/test_run.py (launched by torchrun): writes rankN.json."""
import json
import sys
from pathlib import Path

import torch

from blockyard.train import RunDir, RunFolderError, gather_rows, setup_distributed, shard_rows, teardown_distributed

tmp = Path(sys.argv[1])
info = setup_distributed()
rows = shard_rows(5)
local = torch.stack([rows.double(), rows.double() * 10], dim=1)
result = {"shard": rows.tolist(), "gathered": gather_rows(local, 5).tolist()}
try:
    RunDir(tmp / "used", {"width": 8, "lr": 0.1})
except RunFolderError as err:
    result["refused"] = str(err)
run = RunDir(tmp / "used", {"width": 8, "lr": 0.1}, resume="auto")
result["resumed"] = run.resumed
run.close()
(tmp / f"rank{info.rank}.json").write_text(json.dumps(result))
teardown_distributed()
