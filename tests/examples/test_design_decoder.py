"""Design decoder (stage 3): the conditional denoiser, guidance, the Frechet distance, and the script end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import run_contract as contract
import torch
from design.diffusion import DesignDenoiser, guided_eps, load_decoder
from design.frechet import frechet_distance
from design.sampling import frechet_by_format
from design_decoder import diffusion_loss
from design_runs import make_critics
from gradients import leave_identity_init, without_gradient
from torchrun_helpers import read_metrics, run_example

from blockyard.blocks import DDPMScheduler

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "design_decoder.py"
TIMEOUT = 300


def denoiser(meta: str = "cross_attention", prediction: str = "v") -> DesignDenoiser:
    torch.manual_seed(0)
    net = DesignDenoiser(widths=(8, 16), meta=meta, meta_dim=8, heads=2, prediction=prediction)
    leave_identity_init(net, std=0.3)  # FiLM and the cross-attention output start at zero: metadata must matter
    return net.eval()


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 12, 10, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randint(0, 10, (b,), generator=g), torch.randint(0, 4, (b,), generator=g), torch.rand(b, generator=g))


@pytest.mark.parametrize("meta", ["cross_attention", "additive"])
def test_every_parameter_gets_a_gradient_and_each_field_changes_the_noise_estimate(meta, one_thread):
    net = denoiser(meta, prediction="epsilon")  # the U-Net's own output (v scales it by sqrt(ac), 0.01 at t = 992)
    x, t, goal, fmt, tone = inputs()
    drop = torch.tensor([[True, False, False], [False, True, False], [False, False, True], [False, False, False]])
    net(x, t, goal, fmt, tone, drop).square().mean().backward()
    assert without_gradient(net) == set()
    assert (net.unet.context_dim is None) == (meta == "additive")  # the seed's path has no cross-attention
    with torch.no_grad():
        base = net(x, t, goal, fmt, tone)
        for changed in ((goal + 1) % 10, fmt, tone), (goal, (fmt + 1) % 4, tone), (goal, fmt, 1.0 - tone):
            assert (net(x, t, *changed) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every row moves


def test_a_dropped_field_is_its_null_token_whatever_its_value(one_thread):
    net = denoiser()
    x, t, goal, fmt, tone = inputs()
    other = ((goal + 3) % 10, (fmt + 1) % 4, 1.0 - tone)
    with torch.no_grad():
        all_dropped = torch.ones(4, 3, dtype=torch.bool)
        torch.testing.assert_close(net(x, t, goal, fmt, tone, all_dropped), net(x, t, *other, all_dropped))
        goal_dropped = torch.tensor([[True, False, False]]).expand(4, 3)
        only_goal_dropped = net(x, t, goal, fmt, tone, goal_dropped)
        torch.testing.assert_close(only_goal_dropped, net(x, t, other[0], fmt, tone, goal_dropped))
        assert not torch.allclose(only_goal_dropped, net(x, t, goal, *other[1:], goal_dropped))
        tokens = net.tokens(goal, fmt, tone, all_dropped)
        torch.testing.assert_close(tokens[:, 0], net.goal.weight[10].expand(4, -1))
        torch.testing.assert_close(tokens[:, 1], net.format.weight[4].expand(4, -1))
        torch.testing.assert_close(tokens[:, 2], net.tone_null.expand(4, -1))


def test_guidance_at_scale_one_equals_the_conditional_model(one_thread):
    """Scale 1 is the conditional model, also through the batched two-pass path (which any other scale takes);
    scale 3 is uncond + 3 (cond - uncond) with uncond the all-dropped model."""
    net = denoiser()
    x, t, goal, fmt, tone = inputs()
    with torch.no_grad():
        cond = net(x, t, goal, fmt, tone)
        uncond = net(x, t, goal, fmt, tone, torch.ones(4, 3, dtype=torch.bool))
        assert (cond - uncond).abs().max() > 1e-2  # the two differ: the checks below are not vacuous
        assert torch.equal(guided_eps(net, x, t, goal, fmt, tone, 1.0), cond)
        torch.testing.assert_close(guided_eps(net, x, t, goal, fmt, tone, 1.0, two_pass=True), cond)
        torch.testing.assert_close(guided_eps(net, x, t, goal, fmt, tone, 3.0), uncond + 3.0 * (cond - uncond))


def test_v_prediction_turns_the_unets_velocity_into_the_noise_and_a_bounded_clean_estimate(one_thread):
    """The same weights read as epsilon give the U-Net's raw output F; read as v, the noise is
    sqrt(1 - ac) x_t + sqrt(ac) F and the clean estimate sqrt(ac) x_t - sqrt(1 - ac) F."""
    v_net = denoiser()
    eps_net = DesignDenoiser(widths=(8, 16), meta_dim=8, heads=2, prediction="epsilon").eval()
    eps_net.load_state_dict(v_net.state_dict())
    x, t, goal, fmt, tone = inputs()
    with torch.no_grad():
        raw, eps = eps_net(x, t, goal, fmt, tone), v_net(x, t, goal, fmt, tone)
    ac = DDPMScheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, (1 - ac).sqrt() * x + ac.sqrt() * raw)
    x0 = DDPMScheduler(clip_sample=False).ddim_step(eps, t, torch.full_like(t, -1), x).pred_original_sample
    torch.testing.assert_close(x0, ac.sqrt() * x - (1 - ac).sqrt() * raw, rtol=1e-4, atol=1e-4)


def test_v_loss_is_the_velocity_mse_and_the_epsilon_loss_the_noise_mse():
    g = torch.Generator().manual_seed(0)
    x0, noise, raw = (torch.randn(4, 3, 6, 5, generator=g) for _ in range(3))
    t = torch.tensor([0, 200, 600, 999])
    scheduler = DDPMScheduler()
    ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps_hat = (1 - ac).sqrt() * scheduler.add_noise(x0, noise, t) + ac.sqrt() * raw  # a v-prediction
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x0
    torch.testing.assert_close(diffusion_loss(eps_hat, noise, t, scheduler, "v"), (raw - v).square().mean())
    torch.testing.assert_close(diffusion_loss(eps_hat, noise, t, scheduler, "epsilon"),
                               (eps_hat - noise).square().mean())


def test_bad_metadata_is_refused():
    net = denoiser()
    x, t, goal, fmt, tone = inputs()
    with pytest.raises(ValueError, match=r"drop: expected a \(4, 3\) bool tensor"):
        net(x, t, goal, fmt, tone, torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"format: expected \(4,\)"):
        net(x, t, goal, fmt[:2], tone)
    with pytest.raises(ValueError, match="meta: expected one of"):
        DesignDenoiser(meta="concat")
    with pytest.raises(ValueError, match="prediction: expected one of"):
        DesignDenoiser(prediction="x0")


def naive_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Float64, written out: covariances as sums of outer products, tr sqrt(S_a S_b) from the eigenvalues
    of the (non-symmetric) product, sqrt(S_a S_b) = V diag(sqrt(lambda)) V^-1."""
    def stats(f):
        f = f.double()
        mu = sum(f) / len(f)
        return mu, sum(torch.outer(r - mu, r - mu) for r in f) / (len(f) - 1)

    (mu_a, cov_a), (mu_b, cov_b) = stats(a), stats(b)
    values = torch.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = values.sqrt().sum().real
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt)


@pytest.mark.parametrize(("n_a", "n_b", "dim", "atol"), [(60, 45, 5, 1e-9), (9, 7, 12, 1e-3)])
def test_frechet_distance_matches_a_naive_float64_reference(n_a, n_b, dim, atol):
    """Full-rank covariances, and fewer samples than dimensions (rank-deficient: the reference's eigenvalues
    near 0 carry rounding noise of order 1e-8, whose square roots allow the looser tolerance)."""
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(n_a, dim, generator=g) @ torch.randn(dim, dim, generator=g)
    b = torch.randn(n_b, dim, generator=g) * torch.linspace(0.5, 2.0, dim) + 1.5
    expected = naive_frechet(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, abs=atol, rel=1e-9 if atol < 1e-6 else 1e-4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=atol)
    shift = torch.arange(dim, dtype=torch.float64) / dim  # the same covariance: only the mean term is left
    assert frechet_distance(a.double(), a.double() + shift) == pytest.approx(float(shift.square().sum()), abs=atol)
    with pytest.raises(ValueError, match="with the same D"):
        frechet_distance(a, b[:, :2])


def test_frechet_by_format_averages_the_per_format_distances_and_skips_formats_under_two_rows():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 3, generator=g), torch.randn(16, 3, generator=g) + 0.5
    fa = torch.tensor([0] * 8 + [1] * 11 + [2])  # format 2 has one row in a: left out
    fb = torch.tensor([0] * 5 + [1] * 6 + [2] * 5)
    expected = (frechet_distance(a[fa == 0], b[fb == 0]) + frechet_distance(a[fa == 1], b[fb == 1])) / 2
    assert frechet_by_format(a, fa, b, fb) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def critics(tmp_path_factory):
    return make_critics(tmp_path_factory.mktemp("critics"))


def critic_args(critics) -> tuple[str, ...]:
    return "--encoder", str(critics[0]), "--abstractor", str(critics[1])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, critics):
    out = tmp_path_factory.mktemp("decoder") / "run"
    proc = run_example(SCRIPT, out, *critic_args(critics), timeout=TIMEOUT)
    return out, proc


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_smoke_run_learns_to_denoise_and_reports(ddp_run):
    out, proc = ddp_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 61, 5)) and records[-1]["opt_step"] == 60
    summary = json.loads((out / "summary.json").read_text())
    # learned: below the blank denoiser (U-Net output 0, the v-prediction's "eps = sqrt(1 - ac) x_t"), which the
    # early EMA (about the random init) is above
    first, last, blank = records[0]["val_eps_mse_ema"], records[-1]["val_eps_mse_ema"], summary["val_blank"]["eps_mse"]
    assert first > blank and last < 0.92 * blank, (first, last, blank)
    assert summary["world_size"] == 2
    assert list(summary["results"]) == ["real held-out", "samples s=1", "samples s=2", "samples s=4"]
    for row in list(summary["results"].values())[1:]:
        assert 0 <= row["format_accuracy"] <= 1 and row["frechet"] > 0 and "frechet_by_format_shuffled" in row
    assert "Frechet encoder distance" in proc.stdout
    names = {f"samples_{f}.png" for f in ("poster", "social_post", "flyer", "banner")}
    assert len(summary["plots"]) >= 3 and set(summary["plots"]) <= names  # the formats among 16 conditions
    assert {p.name for p in out.glob("samples_*.png")} == set(summary["plots"])
    decoder = load_decoder(out)  # the EMA weights, as the later stages read them
    ema = json.loads((out / "run.json").read_text())
    assert ema["status"] == "finished" and not decoder.training


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(ddp_run, critics, tmp_path):
    """SIGKILL after optimizer step 23 (the last checkpoint is step 20); --resume auto redraws steps 21-23 from
    their (seed, step, rank) generators and ends with the same metrics and the same evaluation table."""
    out = tmp_path / "run"
    contract.check_sigkill_resume_is_exact(SCRIPT, out, ddp_run[0], ["metrics.jsonl"], 23, *critic_args(critics))
    reference = json.loads((ddp_run[0] / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["table"] == reference["table"]


ON_A_FINISHED_RUN = {
    "used_out_is_refused": lambda script, out, extra: contract.assert_refused(
        script, out, *extra, match="holds an earlier run"),
    "changed_architecture_is_refused": lambda script, out, extra: contract.assert_refused(
        script, out, "--resume", "auto", "--meta", "additive", *extra,
        match='meta: saved "cross_attention", requested "additive"'),
    "damaged_checkpoints_are_refused": lambda script, out, extra: (
        [f.write_bytes(f.read_bytes()[:-17]) for f in (out / "checkpoints").rglob("*.safetensors")],
        contract.assert_refused(script, out, "--resume", "auto", *extra, match="damaged")),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("check", list(ON_A_FINISHED_RUN))
def test_run_contract_on_a_finished_run(ddp_run, critics, tmp_path, check):
    ON_A_FINISHED_RUN[check](SCRIPT, Path(shutil.copytree(ddp_run[0], tmp_path / "run")), critic_args(critics))
