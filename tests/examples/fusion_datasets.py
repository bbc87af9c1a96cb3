"""The two files of a FusionNet dataset that inference reads, written from teacher records (build_data.py writes
them with the stores)."""
from __future__ import annotations

import json
from pathlib import Path


def write_split_records(out: Path, **splits: list[dict]) -> Path:
    """``out/trajectories.jsonl`` (every record) and ``out/splits.json`` (each split's run ids; train, val and test
    are always present, empty unless given)."""
    records = [rec for recs in splits.values() for rec in recs]
    (out / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = {name: [] for name in ("train", "val", "test")} | {k: [r["run_id"] for r in v] for k, v in splits.items()}
    (out / "splits.json").write_text(json.dumps(ids))
    return out
