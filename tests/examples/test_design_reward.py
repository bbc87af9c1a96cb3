"""Reward fine-tuning (stage 4): the clean-sample estimate, the grammar reward, its gradient, the script end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from design.diffusion import DesignDenoiser, load_decoder
from design.generator import sample_designs
from design.grammar import grammar_scores
from design.models import load_abstractor, load_encoder, one_hot_structure
from design.render import render
from design.reward import clean_estimate, formula_structure, grammar_reward
from design.sampling import Judge
from design_reward import best_of_sizes
from design_runs import make_critics, make_decoder, train_encoder
from gradients import leave_identity_init, without_gradient
from torch import nn
from torchrun_helpers import read_metrics, run_example

from blockyard.blocks import DDPMScheduler

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "design_reward.py"
TIMEOUT = 300


def test_clean_estimate_inverts_the_forward_process():
    """With the true noise, the one-step estimate returns the clean design exactly (inside the clip range)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 6, generator=g) * 1.8 - 0.9
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 350, 999])
    scheduler = DDPMScheduler()
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(clean_estimate(scheduler, noise, t, x_t), (x0 + 1) / 2, rtol=0, atol=2e-4)
    wrong = clean_estimate(scheduler, torch.zeros_like(noise), t, x_t)
    assert (wrong[1:] - (x0[1:] + 1) / 2).abs().max() > 0.1  # the noise term matters


class Oracle(nn.Module):
    """An encoder that returns the one-hot soft F of the true structure."""

    def __init__(self, structure: torch.Tensor) -> None:
        super().__init__()
        self.soft = one_hot_structure(structure)

    def soft_structure(self, image: torch.Tensor) -> torch.Tensor:
        return self.soft


def test_formula_reward_of_a_perfect_encoder_is_the_datasets_grammar():
    """On a one-hot soft F, the map the formulas read is the hard F, so the reward is grammar_scores on the truth
    (what the dataset stores): the channels are read from the soft layout correctly."""
    r = render(sample_designs(3, seed=0), 48)
    hard = r.structure()
    image = r.image.float() / 255
    oracle = Oracle(hard)
    assert torch.equal(formula_structure(oracle.soft), hard)
    torch.testing.assert_close(grammar_reward(image, oracle), grammar_scores(image, hard))


@pytest.fixture(scope="module")
def critics(tmp_path_factory):
    return make_critics(tmp_path_factory.mktemp("critics"))


def reward_of_decoder(decoder, encoder, abstractor, source):
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([150, 300])
    eps = decoder(x_t, t, torch.tensor([1, 7]), torch.tensor([0, 3]), torch.tensor([0.3, 0.8]))
    return grammar_reward(clean_estimate(DDPMScheduler(), eps, t, x_t), encoder, source, abstractor).mean()


@pytest.mark.parametrize("source", ["formula", "abstractor"])
def test_reward_gradient_reaches_the_decoder_but_not_the_frozen_critics(critics, source, one_thread):
    """As stage 4 sets it up (critics loaded, then frozen by Judge): every decoder parameter the conditional
    forward uses gets a gradient (the null tone token is unused), no critic parameter does, and a small
    step up the gradient raises the reward."""
    encoder, abstractor = load_encoder(critics[0]), load_abstractor(critics[1])
    Judge(encoder, abstractor)
    torch.manual_seed(0)
    decoder = DesignDenoiser(widths=(8, 16), meta_dim=8, heads=2)
    leave_identity_init(decoder, std=0.3)
    reward = reward_of_decoder(decoder, encoder, abstractor, source)
    reward.backward()
    assert without_gradient(decoder) == {"tone_null"}
    assert all(p.grad is None and not p.requires_grad for p in [*encoder.parameters(), *abstractor.parameters()])
    norm = torch.sqrt(sum(p.grad.square().sum() for p in decoder.parameters() if p.grad is not None))
    with torch.no_grad():
        for p in decoder.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=1e-2 / float(norm))
        assert reward_of_decoder(decoder, encoder, abstractor, source) > reward


def test_abstractor_reward_reads_the_soft_colour_probabilities(critics, one_thread):
    """Through the abstractor, the colour enters as softmax probabilities: the colour head gets a gradient (an
    arg-max would pass none). The formulas do not read the colour class, so there it gets none."""
    encoder, abstractor = load_encoder(critics[0]), load_abstractor(critics[1])
    Judge(encoder, abstractor)
    encoder.color_head.requires_grad_(True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grammar_reward(image, encoder, "abstractor", abstractor).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.color_head.parameters())
    encoder.zero_grad(set_to_none=True)
    grammar_reward(image, encoder, "formula").sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in encoder.color_head.parameters())
    with pytest.raises(ValueError, match="abstractor: expected the trained DesignAbstractor"):
        grammar_reward(image, encoder, "abstractor")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 4 on a random decoder, with the stage-1 encoder trained at --smoke, once up the reward (lambda 100)
    and once down it (lambda -100): everything else equal."""
    root = tmp_path_factory.mktemp("reward")
    encoder = train_encoder(root / "trained")
    _, abstractor = make_critics(root)
    extra = ("--encoder", str(encoder), "--abstractor", str(abstractor), "--decoder", str(make_decoder(root)),
             "--data", str(root / "trained" / "data-smoke"), "--steps", "10", "--lr", "2e-3", "--max-best-of", "2")
    outs = {}
    for weight in ("100", "-100"):
        outs[weight] = root / f"run{weight}"
        outs[weight, "proc"] = run_example(SCRIPT, outs[weight], *extra, "--reward-weight", weight, timeout=TIMEOUT)
    return outs, root / "decoder"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_smoke_run_climbs_the_grammar_reward_and_reports_best_of_n(runs):
    """Up the reward the tuned decoder's samples (same noise) score higher than the un-tuned ones and than the
    run down the reward: the reward's gradient, not the epsilon loss, moves the score."""
    outs, untuned_dir = runs
    up, down = (json.loads((outs[w] / "summary.json").read_text()) for w in ("100", "-100"))
    results = up["results"]
    assert list(results) == ["real held-out", "un-tuned", "tuned"]
    assert results["tuned"]["grammar_mean"] > results["un-tuned"]["grammar_mean"] + 0.01
    assert results["tuned"]["grammar_mean"] > down["results"]["tuned"]["grammar_mean"] + 0.01
    rewards = [r["train_reward"] for r in read_metrics(outs["100"] / "metrics.jsonl")]
    assert rewards[-1] > rewards[0]
    assert up["best_of_n"]["1"] == pytest.approx(results["un-tuned"]["grammar_mean"], abs=1e-6)  # the same noise
    records = read_metrics(outs["100"] / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    # per step: 4 epsilon rows, 4 reward samples of stop + 1 evaluations (stop 5..8: t = 400..100 of 10 steps)
    assert 10 * (4 + 4 * 6) <= records[-1]["evals"] == up["finetune_evals"] <= 10 * (4 + 4 * 9)
    assert up["n_equal_evals"] == pytest.approx(1 + up["finetune_evals"] / (8 * 10))
    tuned, untuned = load_decoder(outs["100"]), load_decoder(untuned_dir)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), untuned.state_dict().values()))
    assert "best-of-" in outs["100", "proc"].stdout and (outs["100"] / "reward_samples.png").stat().st_size > 0
    n_equal = int(up["n_equal_evals"])  # 4.5 to 6: beyond --max-best-of 2
    assert n_equal > 2 and str(n_equal) in up["best_of_n"]
    assert f"best-of-{n_equal} un-tuned (equal evaluations)" in up["table"]
    assert up["table"].count("(equal evaluations)") == 1


def test_best_of_sizes_keep_the_equal_evaluation_n_beyond_the_powers():
    assert best_of_sizes(13.07, 8) == [1, 2, 4, 8, 13]
    assert best_of_sizes(3.9, 8) == [1, 2, 3, 4, 8]
    assert best_of_sizes(1.0, 1) == [1]
