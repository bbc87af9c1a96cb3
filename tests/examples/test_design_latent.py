"""Latent optimisation (stage 5): the differentiable DDIM chain, the Gaussian shell, and the script end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from design.diffusion import DesignDenoiser, ddim_chain, guided_eps
from design_latent import Latents
from design_runs import make_critics, make_decoder
from gradients import leave_identity_init
from torchrun_helpers import read_metrics, run_example

from blockyard.blocks import DDPMScheduler
from blockyard.train import CheckpointManager

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "design_latent.py"
TIMEOUT = 300


def setup(dtype=torch.float32, b: int = 3):
    torch.manual_seed(0)
    net = DesignDenoiser(widths=(8, 16), meta_dim=8, heads=2).to(dtype)
    leave_identity_init(net, std=0.3)
    net.eval()
    g = torch.Generator().manual_seed(1)
    goal, fmt, tone = torch.randint(0, 10, (b,), generator=g), torch.randint(0, 4, (b,), generator=g), torch.rand(b)

    def model(x, t, scale=2.0):  # guided, as the stages sample
        return guided_eps(net, x, t, goal, fmt, tone.to(dtype), scale)

    return net, model


@pytest.mark.parametrize("steps", [4, 10])
def test_ddim_chain_equals_the_schedulers_ddim_sampler_from_the_same_noise(steps, one_thread):
    """The library's non-differentiable sampler (DDPMScheduler.sample, DDIM with eta 0 and the same steps) draws
    x_T from the generator; the chain started from that x_T gives the same sample, and a checkpointed chain too."""
    _, model = setup()
    scheduler = DDPMScheduler()
    shape = (3, 3, 12, 10)
    sampled = scheduler.sample(model, shape, steps=steps, generator=torch.Generator().manual_seed(5))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        chain = ddim_chain(model, x_T, scheduler, steps)
        checkpointed = ddim_chain(model, x_T, scheduler, steps, use_checkpoint=True)
    torch.testing.assert_close(chain.sample, sampled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(checkpointed.sample, sampled, rtol=1e-6, atol=1e-6)
    assert len(chain.x0) == steps and (chain.x0[-1] - chain.sample).abs().max() < 1e-6  # last step: x0 estimate
    # a chain stopped after k steps, continued by hand with the scheduler's DDIM step, is the whole chain
    k, timesteps = steps // 2, scheduler.ddim_timesteps(steps)
    with torch.no_grad():
        x = ddim_chain(model, x_T, scheduler, steps, stop=k).sample
        for i in range(k, steps):
            t_prev = timesteps[i + 1] if i + 1 < steps else -1
            x = scheduler.ddim_step(model(x, torch.full((3,), timesteps[i])), timesteps[i], t_prev, x).prev_sample
    torch.testing.assert_close(x, sampled, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_ddim_chain_passes_the_gradient_to_x_T_and_it_matches_finite_differences(use_checkpoint, one_thread):
    """float64: the autograd directional derivative of <w, sample(x_T)> equals a central difference."""
    _, model = setup(torch.float64)
    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(3, 3, 12, 10, generator=g, dtype=torch.float64).requires_grad_(True)
    w, v = torch.randn(x_T.shape, generator=g, dtype=torch.float64), torch.randn(x_T.shape, generator=g,
                                                                                 dtype=torch.float64)

    def f(x):
        return (w * ddim_chain(model, x, scheduler, 5, use_checkpoint=use_checkpoint).sample).sum()

    f(x_T).backward()
    assert x_T.grad is not None and x_T.grad.abs().amax(dim=(1, 2, 3)).min() > 0  # every sample's noise moves it
    h = 1e-6
    with torch.no_grad():
        numeric = (f(x_T + h * v) - f(x_T - h * v)) / (2 * h)
    assert float((x_T.grad * v).sum()) == pytest.approx(float(numeric), rel=1e-5)


def test_chain_gradient_reaches_the_decoder_weights(one_thread):
    net, model = setup()
    x_T = torch.randn(3, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    ddim_chain(model, x_T, DDPMScheduler(), 3).sample.square().sum().backward()
    assert net.unet.head.weight.grad is not None and net.unet.head.weight.grad.abs().sum() > 0


def test_projection_puts_every_noise_on_the_gaussian_shell_and_keeps_its_direction():
    x = torch.randn(4, 3, 8, 6) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1)
    latents = Latents(x, iters=2, show=2)
    latents.project()
    norms = latents.x_T.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((4,), (3 * 8 * 6) ** 0.5))
    cos = torch.nn.functional.cosine_similarity(latents.x_T.detach().flatten(1), x.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(4))
    assert latents.history.shape == (3, 2, 3, 8, 6) and torch.equal(latents.history[2], x[:2])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    encoder, abstractor = make_critics(root)
    extra = ("--encoder", str(encoder), "--abstractor", str(abstractor), "--decoder", str(make_decoder(root)))
    outs = {}
    for nproc in (2, 1):
        outs[nproc] = root / f"run{nproc}"
        run_example(SCRIPT, outs[nproc], *extra, "--precision", "fp32", nproc=nproc, timeout=TIMEOUT)
    return outs


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_smoke_run_raises_the_grammar_score_and_equals_one_process(runs):
    """The reward climbs and the measured score of the optimised noise beats the drawn noise; two processes,
    each optimising its rows with the gradient summed over them, end where one process does."""
    summary = json.loads((runs[2] / "summary.json").read_text())
    results = summary["results"]
    assert results["after (x_T optimised)"]["grammar_mean"] > results["before (x_T drawn)"]["grammar_mean"] + 0.01
    rewards = [r["reward_before_step"] for r in read_metrics(runs[2] / "metrics.jsonl")]
    assert len(rewards) == 3 and rewards[-1] > rewards[0]
    assert set(summary["best_of_n"]) == {"1", "2", "4"} and summary["n_equal_evals"] == 4
    assert (runs[2] / "latent_sequence.png").stat().st_size > 0
    # every rank holds all of x_T (the gradients are summed over the ranks): rank 0's checkpoint is the whole run's
    saved = {}
    for nproc, out in runs.items():
        latents = Latents(torch.zeros(4, 3, 64, 64), iters=3, show=2)
        assert CheckpointManager(out / "checkpoints", rng=False).load_latest({"latents": latents})["step"] == 3
        saved[nproc] = latents
    torch.testing.assert_close(saved[2].x_T, saved[1].x_T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved[2].history, saved[1].history, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(saved[2].history[0], saved[2].history[-1], atol=1e-2)  # it moved
    single = json.loads((runs[1] / "summary.json").read_text())
    for name in ("before (x_T drawn)", "after (x_T optimised)"):
        assert single["results"][name]["grammar_mean"] == pytest.approx(results[name]["grammar_mean"], abs=1e-4)
    assert single["reward_curve"] == pytest.approx(summary["reward_curve"], abs=1e-5)
