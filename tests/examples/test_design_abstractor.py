"""Design decomposition, stage 2: the abstractor model (hard and soft F), and design_abstractor.py end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from design.build_data import build
from design.ceiling import bayes_ceiling
from design.dataset import open_split
from design.evaluate import metadata_scores
from design.models import DesignAbstractor, load_abstractor, load_encoder, one_hot_structure
from design.vocab import NUM_COLORS
from design_abstractor import abstractor_loss

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DESIGNS = 300  # the scripts' --smoke default: the built data is reused, not rebuilt
TIMEOUT = 300


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("design") / "data"
    build(out, designs=DESIGNS, size=64, seed=0)
    return out


@pytest.fixture(scope="module")
def designs(smoke_data):
    return open_split(smoke_data, "val").get_batch([0, 1, 2, 3])


@pytest.fixture
def abstractor(one_thread):
    torch.manual_seed(0)
    return DesignAbstractor(color_dim=4, hidden=16).eval()


def test_one_hot_soft_f_gives_exactly_the_hard_path_and_passes_gradients(designs, abstractor):
    """The soft path (probabilities times the embedding matrix) and the hard path (an embedding lookup) are
    different code; on a one-hot F they agree to the bit, in eval and in train mode (batch statistics). A soft F
    off the one-hot corners moves the outputs and gets a gradient through its colour probabilities."""
    f = designs.structure
    soft = one_hot_structure(f)
    for train in (False, True):
        abstractor.train(train)
        hard_out, soft_out = abstractor(f), abstractor(soft)
        for name, a, b in zip(hard_out._fields, hard_out, soft_out):
            assert torch.equal(a, b), name
    abstractor.eval()
    mixed = soft.clone()
    mixed[:, 2:-1] = 0.7 * mixed[:, 2:-1] + 0.3 / NUM_COLORS
    mixed.requires_grad_(True)
    out = abstractor(mixed)
    assert not torch.allclose(out.goal, abstractor(f).goal)
    (out.goal[:, 3].sum() + out.grammar.sum() + out.tone.sum()).backward()
    assert mixed.grad[:, 2:-1].abs().sum() > 0 and mixed.grad[:, :2].abs().sum() > 0


def test_colour_enters_through_its_embedding_not_as_a_number(designs, abstractor):
    """Relabelling two colour classes in F and swapping their embedding rows gives the same outputs to the bit
    (a model reading the id as a number has no rows to swap); the control: the relabelling alone changes them."""
    f = designs.structure
    a = int(f[:, 2][f[:, 2] > 0].mode().values)  # the most used colour of these designs
    b = a % (NUM_COLORS - 1) + 1
    swapped = f.clone()
    swapped[:, 2] = torch.where(f[:, 2] == a, float(b), torch.where(f[:, 2] == b, float(a), f[:, 2]))
    original = abstractor(f)
    assert not torch.allclose(abstractor(swapped).goal, original.goal)
    with torch.no_grad():
        weight = abstractor.color_embed.weight
        weight[[a, b]] = weight[[b, a]]
    for name, x, y in zip(original._fields, original, abstractor(swapped)):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)


def test_rejects_a_map_that_is_neither_hard_nor_soft_f(designs, abstractor):
    bad = designs.structure.clone()
    bad[0, 2, 0, 0] = 2.5
    with pytest.raises(ValueError, match="structure: expected colour ids"):
        abstractor(bad)
    with pytest.raises(ValueError, match=r"structure: expected \(B, 4, H, W\) or \(B, 22, H, W\)"):
        abstractor(designs.structure[:, :3])


def test_tone_and_grammar_are_standardised_by_the_training_targets_and_the_loss_uses_the_std(designs, abstractor):
    """Heads' last layers set to a constant z: the outputs are exactly ``mean + std * z`` of the training
    targets; the loss divides each residual by its std (one std off in one of 4 grammar dimensions costs 1/4)."""
    g = torch.Generator().manual_seed(0)
    tone, grammar = torch.rand(50, generator=g), torch.rand(50, 4, generator=g) * torch.tensor([1.0, 0.1, 0.5, 2.0])
    abstractor.set_target_stats(tone, grammar)
    torch.testing.assert_close(abstractor.grammar_std, grammar.std(0))
    z = torch.tensor([0.0, 1.0, 0.0, 0.0])
    for head, bias in ((abstractor.tone_head, torch.zeros(1)), (abstractor.grammar_head, z)):
        last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        last.bias.data.copy_(bias)
    out = abstractor(designs.structure)
    torch.testing.assert_close(out.tone, tone.mean().expand(4))
    torch.testing.assert_close(out.grammar, (grammar.mean(0) + grammar.std(0) * z).expand(4, 4))
    truth = designs._replace(tone=tone.mean().expand(4), grammar=grammar.mean(0).expand(4, 4))
    terms = abstractor_loss(abstractor)(out, truth).terms
    assert terms["tone"].item() == 0.0
    assert terms["grammar"].item() == pytest.approx(0.25, rel=1e-5)


def test_metadata_scores_on_hand_values():
    out = type("Out", (), {})()
    out.goal = torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.0, 1.0]])
    out.format = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out.tone, out.grammar = torch.tensor([0.5, 0.2, 0.9]), torch.zeros(3, 4)
    grammar = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0], [0.2, 0.1, 0.0, 0.5]])
    scores = metadata_scores(out, torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0]), torch.tensor([0.5, 0.5, 0.5]),
                             grammar)
    assert scores["goal_accuracy"] == pytest.approx(2 / 3) and scores["format_accuracy"] == pytest.approx(2 / 3)
    assert scores["tone_mse"] == pytest.approx((0.09 + 0.16) / 3)
    assert scores["grammar_mae"] == pytest.approx([0.1, 0.1, 0.1, 0.3])


def run_stage(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python examples/<script> --smoke --out out *extra`` (one process), failing the test on an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def stages(tmp_path_factory, smoke_data):
    """A finished smoke encoder, then the abstractor smoke run evaluated on its F."""
    root = tmp_path_factory.mktemp("stages")
    run_stage("design_encoder.py", root / "encoder", "--data", str(smoke_data))
    proc = run_stage("design_abstractor.py", root / "abstractor", "--data", str(smoke_data), "--encoder",
                     str(root / "encoder"))
    return root, proc


def flat(scores: dict) -> list[float]:
    return [x for v in scores.values() for x in (v if isinstance(v, list) else [v])]


@pytest.mark.slow
def test_smoke_run_learns_reports_the_three_f_and_the_baselines_and_loads_back(stages, smoke_data, one_thread):
    """120 steps of batch 8 on 240 designs: the training loss falls, format accuracy on the 30 test designs beats
    the majority class, contrast MAE the training mean's. Measured over seeds 0-2: training loss epoch 4 / epoch 1
    0.62-0.75, format 0.40-0.70 (majority 0.30), contrast MAE 0.187-0.225 (mean 0.243); with the learning rate 0:
    1.00, 0.30, 0.244. (Tone and alignment also beat their baselines on these seeds, by margins this small test
    split cannot resolve.) load_abstractor rebuilds the model that scored the summary's numbers, on the true
    F and on the encoder's soft F."""
    root, proc = stages
    out = root / "abstractor"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["test"]) == ["true F", "encoder F", "encoder soft F"]
    c, base = bayes_ceiling(), summary["baselines"]
    assert base["bayes"] == {"goal_accuracy": c.goal_accuracy, "format_accuracy": c.format_accuracy,
                             "tone_mse": c.tone_mse}
    assert base["chance"]["goal_accuracy"] == 0.1 and base["majority"]["tone_mse"] == c.tone_variance
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["opt_step"]) for r in records] == [(1, 30), (2, 60), (3, 90), (4, 120)]
    assert records[-1]["train_loss"] < 0.85 * records[0]["train_loss"]
    test = summary["test"]["true F"]
    assert test["format_accuracy"] > base["majority"]["format_accuracy"] + 0.05
    assert test["grammar_mae"][1] < 0.95 * base["majority"]["grammar_mae"][1]  # contrast
    assert "Bayes here" in proc.stdout and "grammar MAE whitespace" in proc.stdout
    model, encoder = load_abstractor(out), load_encoder(root / "encoder")
    batch = open_split(smoke_data, "test").load()
    with torch.no_grad():
        soft = encoder.soft_structure(batch.image)  # the encoder in fp32, the abstractor under the run's bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = {"true F": model(batch.structure), "encoder soft F": model(soft)}
    for name, output in outputs.items():
        again = metadata_scores(output, batch.goal, batch.format, batch.tone, batch.grammar)
        assert flat(again) == pytest.approx(flat(summary["test"][name]), rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_loaders_refuse_the_wrong_stage_and_an_unfinished_run(stages, tmp_path):
    root, _ = stages
    with pytest.raises(ValueError, match="holds a 'design-encoder', expected a 'design-abstractor'"):
        load_abstractor(root / "encoder")
    with pytest.raises(FileNotFoundError, match="not a run folder of a design stage"):
        load_encoder(tmp_path)
    unfinished = Path(shutil.copytree(root / "encoder", tmp_path / "encoder"))
    record = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**record, "status": "running"}))
    with pytest.raises(ValueError, match="is 'running', not finished"):
        load_encoder(unfinished)
