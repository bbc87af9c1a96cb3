"""Trajectory files in the seed's JSONL format: what is skipped and counted (GA records without zone_grid, "N" ops,
ops that do not apply), the named-line error of a malformed line, the stores built from such a file, and the
inference on a held-out file through fusion_ddp.py."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fusion.build_data import build_from_trajectories, ensure_dataset, main, trajectory_samples
from fusion.env import Status
from fusion.ops import Op
from fusion.teacher import env_from_record, replay, run_teacher
from fusion.trajectories import TrajectoryFileError, clean_record, load_trajectories

from blockyard.data import GroupedStore

SEED_FIELDS = ("run_id", "seed", "grid_W", "grid_H", "zone_pattern", "initial_crossings", "final_crossings",
               "zone_grid", "sequence_len", "sequence_ops", "runtime_sec")
PATTERNS = ("left_right", "stripes", "voronoi", "islands")
SPLITS = ("train", "val", "test")


def seed_format(record: dict) -> dict:
    """A teacher record as the seed's SA wrote it: no init pattern, schedule or zone parameters."""
    return {k: record[k] for k in SEED_FIELDS}


def inapplicable_op(record: dict, at: int) -> dict:
    """An in-bounds op whose window does not match its pattern in the state before op ``at``."""
    env = env_from_record(record)
    for rec in record["sequence_ops"][:at]:
        env.apply(Op.from_record(rec))
    for y in range(env.height - 2):
        for x in range(env.width - 2):
            op = Op(0, y, x)
            if env.evaluate(op).status is Status.PATTERN_MISMATCH:
                return op.to_record()
    raise AssertionError("no mismatching op")


@pytest.fixture(scope="module")
def teacher_records() -> list[dict]:
    return [run_teacher(12, 12, p, seed=s, iters=600, init_pattern="zigzag", run_id=f"sa_{p}_{s}")
            for p in PATTERNS for s in range(3)]


@pytest.fixture(scope="module")
def seed_file(teacher_records, tmp_path_factory) -> Path:
    """12 SA records, a GA record without zone_grid, 2 "N" ops, 2 ops that do not apply (one past the grid)."""
    lines = [seed_format(r) for r in teacher_records]
    ops = lines[1]["sequence_ops"]
    bad = inapplicable_op(teacher_records[1], 4)
    lines[1]["sequence_ops"] = [*ops[:4], {"kind": "N", "x": 0, "y": 0, "variant": "n"}, bad, *ops[4:]]
    lines[5]["sequence_ops"] = [*lines[5]["sequence_ops"], {"kind": "T", "x": 11, "y": 3, "variant": "sr"}]
    ga = {**seed_format(teacher_records[0]), "run_id": "ga_0", "sequence_ops": [{"kind": "N", "x": 0, "y": 0,
                                                                                "variant": "w"}]}
    del ga["zone_grid"]
    lines.insert(3, ga)
    path = tmp_path_factory.mktemp("seedfile") / "final_dataset.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # a trailing blank line is fine
    return path


@pytest.fixture(scope="module")
def imported(seed_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "data"
    return out, build_from_trajectories(out, seed_file, workers=1, fractions=(0.34, 0.33, 0.33), verbose=False)


def test_the_seeds_file_gives_the_expected_counts(imported, teacher_records):
    _, summary = imported
    applied = sum(len(r["sequence_ops"]) for r in teacher_records)
    assert summary["import"] == {"lines": 13, "skipped_no_zone_grid": 1, "applied_ops": applied, "noop_ops": 1,
                                 "skipped_ops": 2, "initial_mismatch": 0}
    assert summary["trajectories"] == 12


def sample_key(trajectory, state, target, history, history_len, crossings) -> tuple:
    return (trajectory, np.asarray(state).tobytes(), tuple(np.asarray(target).tolist()),
            np.asarray(history).tobytes(), int(history_len), int(crossings))


def test_skipped_ops_leave_the_state_as_it_was(imported, teacher_records):
    """The stored samples are exactly those of the clean teacher records: an "N" op or an op that does not
    apply changed nothing (a half-applied op would change every later state)."""
    out, summary = imported
    stored = Counter()
    for split in SPLITS:
        store = GroupedStore(out / split, verify=False)
        keep = range(len(store)) if split != "train" else \
            np.flatnonzero(store.source_index < summary["samples"]["train_unique"])  # not the oversampled copies
        for i in keep:
            s = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in store[int(i)].items()}
            stored[sample_key(s["trajectory"], s["state"], s["target"], s["history"], s["history_len"],
                              s["crossings"])] += 1
    expected = Counter()
    for rec in teacher_records:
        t = trajectory_samples(rec)
        for j in range(len(t["crossings"])):
            expected[sample_key(rec["run_id"], t["state"][j], t["target"][j], t["history"][j], t["history_len"][j],
                                t["crossings"][j])] += 1
    assert sum(expected.values()) > 100 and stored == expected


def test_cleaned_records_replay_exactly_and_splits_are_by_trajectory(imported, teacher_records):
    out, _ = imported
    records = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    by_id = {r["run_id"]: r for r in teacher_records}
    assert sorted(r["run_id"] for r in records) == sorted(by_id)
    for rec in records:
        assert rec["init_pattern"] == "zigzag" and rec["sequence_ops"] == by_id[rec["run_id"]]["sequence_ops"]
        assert replay(rec).crossings[-1] == by_id[rec["run_id"]]["final_crossings"]
    assert [(r["noop_ops"], r["skipped_ops"], r["source_line"]) for r in records if r["run_id"] == "sa_left_right_1"] \
        == [(1, 1, 2)]
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(run_id for ids in splits.values() for run_id in ids) == sorted(by_id)
    for split in SPLITS:
        assert [len(x) for x in splits.values()] == [4, 4, 4]  # one trajectory of each pattern per split
        ids = set(GroupedStore(out / split, verify=False).column("trajectory"))
        assert ids <= set(splits[split])


def line_with(problem: str, good: dict) -> str:
    rec = json.loads(json.dumps(good))
    if problem == "not json":
        return '{"run_id": "x", '
    if problem == "missing field":
        del rec["final_crossings"]
    elif problem == "zone_grid length":
        rec["zone_grid"] = rec["zone_grid"][:-1]
    elif problem == "unknown variant":
        rec["sequence_ops"][0]["variant"] = "up"
    elif problem == "kind contradicts variant":
        rec["sequence_ops"][0] = {"kind": "F", "x": 0, "y": 0, "variant": "nl"}
    elif problem == "repeated run_id":
        rec["run_id"] = "sa_left_right_0"
    return json.dumps(rec)


@pytest.mark.parametrize(("problem", "match"), [
    ("not json", "not valid JSON"), ("missing field", "missing field 'final_crossings'"),
    ("zone_grid length", r"zone_grid: expected 144 \(grid_W \* grid_H\) integers, got 143"),
    ("unknown variant", r"sequence_ops\[0\].variant: expected one of"),
    ("kind contradicts variant", r"sequence_ops\[0\]: kind 'F' contradicts variant 'nl'"),
    ("repeated run_id", "run_id 'sa_left_right_0' repeats line 1"),
])
def test_a_malformed_line_stops_the_build_naming_file_and_line(problem, match, teacher_records, tmp_path):
    lines = [json.dumps(seed_format(r)) for r in teacher_records[:3]]
    lines.insert(2, "")  # blank lines are skipped but still counted as lines of the file
    lines.insert(3, line_with(problem, seed_format(teacher_records[3])))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    with pytest.raises(TrajectoryFileError, match=rf"{re.escape(str(path))}, line 4: {match}"):
        build_from_trajectories(out, path, workers=1, verbose=False)
    assert not out.exists()  # nothing written
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--trajectories", str(path)])
    assert exit_info.value.code == 1


def test_a_record_that_did_not_start_on_the_zigzag_is_counted(tmp_path):
    # horizontal stripes: the vertical zigzag crosses every boundary in every column, the zigzag once per boundary
    rec = run_teacher(12, 12, "stripes", seed=1, iters=600, init_pattern="vertical_zigzag", stripe_direction="h")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(seed_format(rec)) + "\n")
    (clean,), counts = load_trajectories(path)
    zigzag = clean_record({**seed_format(rec), "sequence_ops": []})[0]["initial_crossings"]
    assert zigzag != rec["initial_crossings"]
    assert counts["initial_mismatch"] == 1 and clean["recorded_initial_crossings"] == rec["initial_crossings"]
    assert clean["initial_crossings"] == zigzag == replay(clean).crossings[0]
    assert counts["applied_ops"] + counts["skipped_ops"] == len(rec["sequence_ops"]) and counts["skipped_ops"] > 0


def test_a_build_from_another_source_is_refused(imported, teacher_records, tmp_path):
    out, _ = imported
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(seed_format(teacher_records[0])) + "\n")
    with pytest.raises(ValueError, match="built from another file"):
        ensure_dataset(out, trajectories=other)
    assert ensure_dataset(out, trajectories=Path(json.loads((out / "build.json").read_text())["args"]
                                                 ["trajectories"])) == out


@pytest.mark.slow
def test_fusion_ddp_trains_on_a_seed_file_and_prints_the_seeds_table_on_a_held_out_file(seed_file, tmp_path):
    """``--trajectories`` builds OUT/data from the file; ``--test-trajectories`` (with a GA record) is the held-out
    set of every setting, setting 3 being the seed's inference table; ``--levels 4`` is the seed's U-Net (a 12x12
    grid pools to 1x1, so the bottleneck is 16 wide: two channels per GroupNorm group)."""
    from run_contract import run

    held_out = [seed_format(run_teacher(12, 12, p, seed=10, iters=600, init_pattern="zigzag", run_id=f"test_{p}"))
                for p in PATTERNS]
    ga = {k: v for k, v in held_out[0].items() if k != "zone_grid"} | {"run_id": "ga_test"}
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join(json.dumps(r) for r in [*held_out, ga]) + "\n")
    out = tmp_path / "run"
    script = Path(__file__).resolve().parents[2] / "examples" / "fusion_ddp.py"
    code, text = run(script, out, "--trajectories", str(seed_file), "--test-trajectories", str(test_file),
                     "--levels", "4", "--widths", "8,8,16,16", "--warmup", "3", nproc=1)
    assert code == 0, text[-3000:]
    assert f"test trajectories {test_file}: 4 records used of 5 lines, 1 skipped without zone_grid" in text
    assert "imported 13 lines: 1 records skipped without zone_grid" in text
    assert "Setting 3: the seed's inference protocol from the initial paths" in text
    build = json.loads((out / "data" / "build.json").read_text())
    assert build["args"]["trajectories"] == str(seed_file.resolve()) and build["import"]["skipped_ops"] == 2
    summary = json.loads((out / "summary.json").read_text())
    inference = summary["inference"]
    assert inference["n_test_trajectories"] == 4 and inference["test_source"] == "test_records"
    assert list(inference["setting3"]) == [*sorted(PATTERNS), "overall"]
    for p, rec in zip(PATTERNS, held_out):
        row = inference["setting3"][p]
        assert row["n"] == 1 and row["teacher_mean_reduction"] == rec["initial_crossings"] - rec["final_crossings"]
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["levels"], config["warmup"], config["test_trajectories"]) == (4, 3, str(test_file))
