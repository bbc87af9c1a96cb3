"""build_data.py's scale flags (grid sizes up to the seed's 128 canvas, teacher budget growing with the area), the
improving-set statistics of the build table against a recount from the stores, and old builds refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fusion.batches import FusionSamples
from fusion.build_data import SEED_SIZES, SIZES, build_dataset, ensure_dataset, main, parse_sizes, teacher_iters
from fusion.encoding import decode_ops

from blockyard.data import GroupedStore

SPLITS = ("train", "val", "test")


def test_sizes_are_named_or_listed_and_bounded_by_the_canvas():
    assert parse_sizes("seed") == list(SEED_SIZES) and parse_sizes("default") == list(SIZES)
    assert max(max(s) for s in SEED_SIZES) == 100
    assert parse_sizes("16x16,30X100") == [(16, 16), (30, 100)]
    for bad in ("16", "16x", "axb", "16x16x2", ""):
        with pytest.raises(ValueError, match="sizes: expected"):
            parse_sizes(bad)
    for bad in ("129x16", "16x2"):
        with pytest.raises(SystemExit) as info:
            main(["--sizes", bad, "--out", "unused"])
        assert info.value.code == 2
    with pytest.raises(ValueError, match=r"sizes: expected \(height, width\) pairs with sides in \[3, 128\]"):
        build_dataset("unused", sizes=[(16, 130)], verbose=False)


def test_teacher_budget_grows_with_the_area_beyond_32x32_only_when_asked():
    assert teacher_iters(3000, 100, 100, "fixed") == 3000
    assert teacher_iters(3000, 100, 100, "area") == round(3000 * 10_000 / 1024) == 29297
    assert teacher_iters(3000, 30, 100, "area") == round(3000 * 3000 / 1024)
    assert teacher_iters(3000, 16, 24, "area") == 3000  # never below the budget
    with pytest.raises(ValueError, match="iters_scale: expected"):
        teacher_iters(3000, 16, 16, "square")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_scale") / "data"
    main(["--out", str(out), "--sizes", "40x40,12x20", "--per-cell", "2", "--iters", "400", "--iters-scale", "area",
          "--workers", "2"])
    return out


def test_a_scaled_build_uses_the_sizes_and_budgets_it_was_given(scaled):
    summary = json.loads((scaled / "build.json").read_text())
    assert summary["args"]["sizes"] == [[40, 40], [12, 20]] and summary["args"]["iters_scale"] == "area"
    records = [json.loads(line) for line in (scaled / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 4
    for r in records:
        assert r["iters"] == (round(400 * 1600 / 1024) if r["grid_H"] == 40 else 400)
    shapes = {tuple(g.key) for k in SPLITS for g in GroupedStore(scaled / k).groups}
    assert shapes <= {(40, 40), (12, 20)} and (40, 40) in shapes


def test_build_table_improving_statistics_equal_a_recount_from_the_stores(scaled):
    summary = json.loads((scaled / "build.json").read_text())
    counts = []  # improving ops of every unique sample (train: its first copies only)
    for split in SPLITS:
        store = GroupedStore(scaled / split)
        unique = summary["samples"]["train_unique"] if split == "train" else len(store)
        for i in np.flatnonzero(store.source_index < unique):
            counts.append(int((decode_ops(store[int(i)]["ops"].numpy())[3] < 0).sum()))
    rows = summary["cells"]
    n = sum(r["samples"] for r in rows)
    assert n == len(counts)
    assert sum(r["improving_per_state"] * r["samples"] for r in rows) == pytest.approx(sum(counts))
    assert sum(r["teacher_ceiling_top1"] * r["samples"] for r in rows) == pytest.approx(sum(1 / c for c in counts))
    assert min(counts) >= 1


def test_builds_without_op_sets_are_refused_by_name(scaled, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "build.json").write_text(json.dumps({"format": "blockyard.fusion-dataset", "version": 1}))
    with pytest.raises(ValueError, match="build format version 1, expected 2"):
        ensure_dataset(old)
    store_path = tmp_path / "no_ops"
    GroupedStore.write(store_path, [{"state": np.zeros((4, 5, 5), np.float16), "target": np.zeros(3, np.int64)}])
    with pytest.raises(ValueError, match="store: expected the field 'ops'"):
        FusionSamples(GroupedStore(store_path))
    assert ensure_dataset(scaled) == scaled  # the current format is accepted
