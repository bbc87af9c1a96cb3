"""Design decomposition: the cached dataset (build_data.py) and its loader (dataset.py)."""
import shutil

import numpy as np
import pytest
import torch
from design.build_data import build, main
from design.ceiling import bayes_ceiling
from design.dataset import SPLITS, DesignBatch, open_split
from design.generator import design_latents
from design.grammar import grammar_scores
from design.render import render

from blockyard.data import CorruptedStoreError

pytestmark = pytest.mark.usefixtures("one_thread")
DESIGNS = 240


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("design") / "data"
    return out, build(out, designs=DESIGNS, size=64, seed=2)


def test_splits_partition_the_designs_and_share_no_image(built):
    out, summary = built
    data = {k: open_split(out, k) for k in SPLITS}
    index = {k: d.store.column("index").numpy() for k, d in data.items()}
    assert summary["duplicates_dropped"] == 0
    assert sorted(np.concatenate(list(index.values())).tolist()) == list(range(DESIGNS))
    assert [len(index[k]) for k in SPLITS] == [192, 24, 24] == [summary["samples"][k] for k in SPLITS]
    images = {k: {bytes(img.numpy()) for img in d.store.column("image")} for k, d in data.items()}
    assert sum(len(v) for v in images.values()) == DESIGNS  # distinct within and across splits
    assert summary["ceiling"] == bayes_ceiling()._asdict()


def test_stored_samples_equal_a_fresh_rendering_of_their_design(built):
    out, _ = built
    data = open_split(out, "val")
    batch = data.load()
    designs = [data.design(i) for i in range(len(data))]
    r = render(designs, 64)
    torch.testing.assert_close(batch.image, r.image.float() / 255, rtol=0, atol=0)
    torch.testing.assert_close(batch.structure, r.structure(), rtol=0, atol=0)
    torch.testing.assert_close(batch.grammar, grammar_scores(r.image, r.structure()))
    lat = [design_latents(d) for d in designs]
    assert batch.goal.tolist() == [z.goal for z in lat] and batch.format.tolist() == [z.format for z in lat]
    assert batch.latents.tolist() == [list(z.revealed()) for z in lat]
    torch.testing.assert_close(batch.tone, torch.tensor([z.tone for z in lat], dtype=torch.float32))


def test_dataloader_collates_samples_into_design_batches(built):
    out, _ = built
    data = open_split(out, "train", verify=False)
    first = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert isinstance(first, DesignBatch)
    expected = data.get_batch([0, 1, 2, 3])
    shapes = {"image": (4, 3, 64, 64), "structure": (4, 4, 64, 64), "goal": (4,), "format": (4,), "tone": (4,),
              "grammar": (4, 4), "latents": (4, 6), "index": (4,)}
    for name, shape in shapes.items():
        assert tuple(getattr(first, name).shape) == shape, name
        torch.testing.assert_close(getattr(first, name), getattr(expected, name), rtol=0, atol=0)
    assert first.goal.dtype == torch.int64 and first.image.dtype == torch.float32


def test_corrupted_or_truncated_files_are_detected_on_open(built, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    group = next((copy / "train").glob("*.safetensors"))
    raw = bytearray(group.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    group.write_bytes(bytes(raw))
    with pytest.raises(CorruptedStoreError, match=r"group_0000_64x64.safetensors: sha256 does not match"):
        open_split(copy, "train")
    assert len(open_split(copy, "val")) == 24  # the other splits are intact
    group.write_bytes(bytes(raw[:-100]))
    with pytest.raises(CorruptedStoreError, match=r"size \d+ bytes, index says \d+ \(truncated\?\)"):
        open_split(copy, "train", verify=False)


def test_finished_build_is_reused_other_settings_refused_unfinished_rebuilt(built, tmp_path):
    out, summary = built
    assert build(out, designs=DESIGNS, size=64, seed=2) == summary
    with pytest.raises(ValueError, match="holds a finished build with other settings"):
        build(out, designs=DESIGNS, size=64, seed=3)
    small = tmp_path / "small"
    first = build(small, designs=30, size=32, seed=1)
    (small / "build.json").unlink()  # an interrupted build: no build.json
    (small / "train" / "index.json").write_text("garbage")
    again = build(small, designs=30, size=32, seed=1)
    assert again["samples"] == first["samples"] and len(open_split(small, "train")) == first["samples"]["train"]
    with pytest.raises(FileNotFoundError, match="not a finished design dataset"):
        open_split(tmp_path / "nothing", "train")
    with pytest.raises(ValueError, match="split: expected one of"):
        open_split(small, "training")


@pytest.mark.slow  # spawns two processes that import torch: 5 s on an idle 2-core machine, 30 s on a busy one
def test_worker_processes_give_the_same_data(tmp_path):
    one = build(tmp_path / "one", designs=20, size=32, seed=4, workers=1)
    two = build(tmp_path / "two", designs=20, size=32, seed=4, workers=2)
    assert one["samples"] == two["samples"]
    for split in SPLITS:
        a, b = open_split(tmp_path / "one", split).load(), open_split(tmp_path / "two", split).load()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_repeated_image_is_stored_once(tmp_path, monkeypatch):
    import design.build_data as builder

    real = builder.make_samples

    def repeating(seed, start, count, size):  # design 7 renders like design 3
        arrays = real(seed, start, count, size)
        arrays["image"][7] = arrays["image"][3]
        return arrays

    monkeypatch.setattr(builder, "make_samples", repeating)
    summary = build(tmp_path / "dup", designs=20, size=32, seed=4)
    assert summary["duplicates_dropped"] == 1 and sum(summary["samples"].values()) == 19
    stored = np.concatenate([open_split(tmp_path / "dup", k).store.column("index").numpy() for k in SPLITS])
    assert sorted(stored.tolist()) == [i for i in range(20) if i != 7]


def test_cli_prints_the_table(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--designs", "30", "--size", "32", "--workers", "1"])
    text = capsys.readouterr().out
    assert "Bayes ceiling: goal 0.5929 (chance 0.10, majority 0.12), format 0.9060" in text
    assert "30 designs at 32 px, 0 duplicate images dropped" in text
