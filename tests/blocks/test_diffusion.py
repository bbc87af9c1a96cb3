import math

import numpy as np
import pytest
import torch

from blockyard.blocks import DDPMScheduler, DDPMStepOutput


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ref_alphas_cumprod(schedule="linear", T=1000, b0=1e-4, b1=0.02):
    """The published schedules in float64 (DDPM linear, 'scaled_linear', Nichol & Dhariwal cosine)."""
    if schedule == "linear":
        betas = np.linspace(b0, b1, T)
    elif schedule == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, T) ** 2
    else:
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return betas, np.cumprod(1 - betas)


def ref_step(eps, t, x, z, ac, clip=True, t_prev=None):
    """diffusers' DDPMScheduler.step (epsilon, fixed_small), one sample at a time, float64."""
    eps, x, z = eps.double(), x.double(), None if z is None else z.double()
    tp = t - 1 if t_prev is None else t_prev
    a_t = float(ac[t])
    a_p = float(ac[tp]) if tp >= 0 else 1.0
    cur_alpha = a_t / a_p
    cur_beta = 1 - cur_alpha
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (math.sqrt(a_p) * cur_beta / (1 - a_t)) * x0 + (math.sqrt(cur_alpha) * (1 - a_p) / (1 - a_t)) * x
    var = max((1 - a_p) / (1 - a_t) * cur_beta, 1e-20)
    prev = mean + math.sqrt(var) * z if t > 0 else mean
    return prev, x0


def test_buffers_match_published_schedules_and_hand_values():
    s = DDPMScheduler()
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float32
    assert s.betas.shape == s.alphas_cumprod.shape == (1000,)
    # diffusers builds exactly this (float32 linspace, float32 cumprod)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), rtol=0, atol=0)
    betas, ac = ref_alphas_cumprod()
    np.testing.assert_allclose(s.betas.double().numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod.double().numpy(), ac, rtol=2e-5)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    beta1 = 1e-4 + (0.02 - 1e-4) / 999
    assert s.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - beta1), abs=1e-7)
    # diffusers' test_variance reference values (research notes 4.1)
    var = s.posterior_variance(torch.tensor([0, 487, 999]))
    assert var[0].item() == pytest.approx(0.0, abs=1e-5) and var[0].item() > 0
    assert var[1].item() == pytest.approx(0.00979, abs=1e-5)
    assert var[2].item() == pytest.approx(0.02, abs=1e-5)


@pytest.mark.parametrize("schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_other_schedules_match_formulas(schedule):
    s = DDPMScheduler(schedule=schedule)
    betas, ac = ref_alphas_cumprod(schedule)
    np.testing.assert_allclose(s.betas.double().numpy(), betas, rtol=1e-5)
    np.testing.assert_allclose(s.alphas_cumprod.double().numpy(), ac, rtol=1e-4, atol=1e-9)
    if schedule == "squaredcos_cap_v2":
        assert s.betas.max().item() == pytest.approx(0.999)  # the cap


def test_posterior_variance_matches_lucidrains_form():
    # lucidrains: beta_t (1 - ac_{t-1}) / (1 - ac_t) in float64 (research 2.3); ours: diffusers' form in float32
    s = DDPMScheduler()
    betas, ac = ref_alphas_cumprod()
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    expected = np.maximum(betas * (1 - ac_prev) / (1 - ac), 1e-20)
    got = s.posterior_variance(torch.arange(1000)).double().numpy()
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-3)  # float32 cancellation in 1 - ac_t/ac_prev
    assert got[0] == pytest.approx(1e-20, rel=1e-3)


def test_add_noise_closed_form_any_trailing_dims():
    s = DDPMScheduler()
    ac = s.alphas_cumprod.double()
    t = torch.tensor([0, 1, 500, 999])
    for shape in [(4, 3), (4, 2, 5, 6), (4, 2, 3, 3, 3)]:
        x0, noise = torch.randn(shape), torch.randn(shape)
        out = s.add_noise(x0, noise, t)
        assert out.shape == shape and out.dtype == torch.float32
        for b in range(4):
            a = float(ac[t[b]])
            expected = math.sqrt(a) * x0[b].double() + math.sqrt(1 - a) * noise[b].double()
            torch.testing.assert_close(out[b].double(), expected)
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(s.add_noise(x0, noise, 7), s.add_noise(x0, noise, torch.full((3,), 7)))


def test_add_noise_half_precision_keeps_small_noise_scale():
    # diffusers computes 1 - ac[0] in the input dtype: 0 in bfloat16. Ours uses float32 coefficients.
    s = DDPMScheduler()
    out = s.add_noise(torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16), 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.full((2, 3), 0.01), rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_matches_diffusers_formulas(dtype):
    s = DDPMScheduler()
    ac = s.alphas_cumprod.double()
    # float32 rounding of x_t is amplified by 1 / sqrt(ac_t) (157 at t = 999); float64 shows the formulas agree
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    x, eps = torch.randn(5, 2, 4, 4, dtype=dtype) * 1.5, torch.randn(5, 2, 4, 4, dtype=dtype)
    for t in [999, 487, 10, 1]:
        out = s.step(eps, t, x, generator=gen(3))
        assert isinstance(out, DDPMStepOutput) and out.prev_sample.dtype == dtype
        z = torch.randn(x.shape, generator=gen(3), dtype=dtype)  # the one draw diffusers makes
        prev, x0 = ref_step(eps, t, x, z, ac)
        torch.testing.assert_close(out.pred_original_sample.double(), x0, **tol)
        torch.testing.assert_close(out.prev_sample.double(), prev, **tol)
    # strided step (t -> t_prev) uses alpha_t = ac_t / ac_prev, as diffusers does with set_timesteps
    out = s.step(eps, 500, x, generator=gen(4), t_prev=480)
    prev, _ = ref_step(eps, 500, x, torch.randn(x.shape, generator=gen(4), dtype=dtype), ac, t_prev=480)
    torch.testing.assert_close(out.prev_sample.double(), prev, **tol)


def test_step_per_sample_timesteps_vectorised():
    s = DDPMScheduler()
    ac = s.alphas_cumprod.double()
    t = torch.tensor([999, 0, 250, 1, 0])
    x, eps = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    out = s.step(eps, t, x, generator=gen(0))
    z = torch.randn(x.shape, generator=gen(0))
    for b in range(5):
        prev, x0 = ref_step(eps[b : b + 1], int(t[b]), x[b : b + 1], z[b : b + 1], ac)
        torch.testing.assert_close(out.prev_sample[b : b + 1].double(), prev, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pred_original_sample[b : b + 1].double(), x0, rtol=1e-4, atol=1e-4)
    # an all-equal tensor t gives the int path's numbers
    same = s.step(eps, torch.full((5,), 250), x, generator=gen(1)).prev_sample
    torch.testing.assert_close(same, s.step(eps, 250, x, generator=gen(1)).prev_sample)


def test_step_at_t0_adds_no_noise_and_returns_x0():
    s = DDPMScheduler()
    x, eps = torch.randn(3, 8), torch.randn(3, 8)
    a, b = s.step(eps, 0, x, generator=gen(0)), s.step(eps, 0, x, generator=gen(1))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(a.prev_sample, a.pred_original_sample)  # coef on x_t is 0, on x0 is 1
    g = gen(5)
    s.step(eps, 0, x, generator=g)
    assert torch.equal(g.get_state(), gen(5).get_state())  # int t = 0 draws nothing (like diffusers)
    t = torch.tensor([0, 5, 0])
    c, d = s.step(eps, t, x, generator=gen(0)), s.step(eps, t, x, generator=gen(1))
    assert torch.equal(c.prev_sample[[0, 2]], d.prev_sample[[0, 2]])
    assert not torch.allclose(c.prev_sample[1], d.prev_sample[1])


def test_step_noise_scale_is_posterior_std():
    s = DDPMScheduler()
    x, eps = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.tensor([1, 100, 500, 999])
    diff = s.step(eps, t, x, generator=gen(0)).prev_sample - s.step(eps, t, x, generator=gen(1)).prev_sample
    dz = torch.randn(4, 6, generator=gen(0)) - torch.randn(4, 6, generator=gen(1))
    std = s.posterior_variance(t).sqrt()
    torch.testing.assert_close(diff, std[:, None] * dz, rtol=1e-4, atol=1e-7)


def test_clip_sample_switch():
    x, eps = torch.full((2, 3), 5.0), torch.zeros(2, 3)
    assert DDPMScheduler().step(eps, 10, x).pred_original_sample.max().item() == 1.0
    assert DDPMScheduler(clip_sample=False).step(eps, 10, x).pred_original_sample.max().item() > 4.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_eta0_is_deterministic_and_recovers_x0(dtype):
    s = DDPMScheduler()
    x0 = torch.rand(6, 2, 5, dtype=dtype) * 1.8 - 0.9
    eps = torch.randn(6, 2, 5, dtype=dtype)
    t = torch.tensor([999, 700, 300, 20, 1, 0])
    x_t = s.add_noise(x0, eps, t)
    a = s.ddim_step(eps, t, torch.full((6,), -1), x_t, generator=gen(0))
    b = s.ddim_step(eps, t, torch.full((6,), -1), x_t, generator=gen(1))
    assert torch.equal(a.prev_sample, b.prev_sample)
    tol = {"rtol": 0, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 1e-12}
    torch.testing.assert_close(a.prev_sample, x0, **tol)
    # an intermediate eta=0 step keeps the same noise: x_t -> x_{t'} = add_noise(x0, eps, t')
    t_prev = torch.tensor([500, 0, 100, 3, 0, -1])
    mid = s.ddim_step(eps, t, t_prev, x_t).prev_sample
    torch.testing.assert_close(mid[:5], s.add_noise(x0[:5], eps[:5], t_prev[:5]), **tol)


def test_ddim_eta1_noise_scale():
    s = DDPMScheduler()
    x, eps = torch.randn(2, 4), torch.randn(2, 4)
    diff = s.ddim_step(eps, 600, 580, x, eta=1.0, generator=gen(0)).prev_sample - \
        s.ddim_step(eps, 600, 580, x, eta=1.0, generator=gen(1)).prev_sample
    dz = torch.randn(2, 4, generator=gen(0)) - torch.randn(2, 4, generator=gen(1))
    ac = s.alphas_cumprod.double()
    sigma = math.sqrt((1 - ac[580]) / (1 - ac[600]) * (1 - ac[600] / ac[580]))
    torch.testing.assert_close(diff.double(), sigma * dz.double(), rtol=1e-4, atol=1e-7)


def ref_ddim(eps, t, t_prev, x, z, ac, eta, use_clipped_model_output):
    """diffusers' DDIMScheduler.step (epsilon, clip_sample=True, set_alpha_to_one=True) written out, float64."""
    eps, x = eps.double(), x.double()
    a_t = float(ac[t])
    a_p = float(ac[t_prev]) if t_prev >= 0 else 1.0
    x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
    if use_clipped_model_output:
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    prev = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps
    return (prev + sigma * z.double() if eta > 0 else prev), x0


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_step_model_output_as_diffusers(use_clipped, eta):
    # x_t built so that the predicted x0 leaves [-1, 1] for half the entries: the clip is active
    s = DDPMScheduler()
    eps = torch.randn(4, 6, generator=gen(3), dtype=torch.float64)
    x0 = torch.linspace(-2.5, 2.5, 24, dtype=torch.float64).view(4, 6)
    t, t_prev = 500, 300
    x_t = s.add_noise(x0, eps, t)
    got = s.ddim_step(eps, t, t_prev, x_t, eta=eta, generator=gen(7), use_clipped_model_output=use_clipped)
    z = torch.randn(4, 6, generator=gen(7), dtype=torch.float64)
    prev, want_x0 = ref_ddim(eps, t, t_prev, x_t, z, s.alphas_cumprod.double(), eta, use_clipped)
    torch.testing.assert_close(got.pred_original_sample, want_x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.prev_sample, prev, rtol=0, atol=1e-12)
    # the default re-derives eps from the clipped x0 (GLIDE; diffusers' keyword set to True), and the
    # two variants differ exactly where x0 was clipped
    default = s.ddim_step(eps, t, t_prev, x_t, eta=eta, generator=gen(7)).prev_sample
    other = s.ddim_step(eps, t, t_prev, x_t, eta=eta, generator=gen(7), use_clipped_model_output=not use_clipped)
    torch.testing.assert_close(default, prev if use_clipped else other.prev_sample, rtol=0, atol=0)
    clipped = x0.abs() > 1
    assert clipped.any() and (~clipped).any()
    torch.testing.assert_close(got.prev_sample[~clipped], other.prev_sample[~clipped], rtol=0, atol=1e-12)
    assert (got.prev_sample[clipped] != other.prev_sample[clipped]).all()


def oracle(s, seen):
    def model(x, t, target):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        ac = s.alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        return (x - ac.sqrt() * target) / (1 - ac).sqrt()  # the true noise for this x_t
    return model


@pytest.mark.parametrize("steps", [None, 50])
def test_sample_with_oracle_reaches_x0(steps):
    s = DDPMScheduler()
    x0 = torch.rand(2, 1, 4, 4) * 1.8 - 0.9
    seen = []
    out = s.sample(oracle(s, seen), (2, 1, 4, 4), steps=steps, generator=gen(0), target=x0)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert seen == (list(range(999, -1, -1)) if steps is None else list(range(980, -1, -20)))


def test_sample_generator_reproducible():
    s = DDPMScheduler(num_steps=50)
    model = lambda x, t: 0.1 * x  # noqa: E731
    a = s.sample(model, (2, 3), generator=gen(0))
    b = s.sample(model, (2, 3), generator=gen(0))
    c = s.sample(model, (2, 3), generator=gen(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    d = s.sample(model, (2, 3), steps=10, eta=1.0, generator=gen(0))
    assert torch.equal(d, s.sample(model, (2, 3), steps=10, eta=1.0, generator=gen(0)))
    assert not a.requires_grad


@pytest.mark.parametrize(("dtype", "clip", "schedule"), [(torch.float32, True, "linear"),
                                                        (torch.float32, False, "squaredcos_cap_v2"),
                                                        (torch.float64, True, "linear")])
def test_ancestral_sample_is_bitwise_the_loop_of_steps(dtype, clip, schedule):
    # sample() precomputes the chain's coefficients; it must be step() applied T times, bit for bit
    s = DDPMScheduler(num_steps=60, clip_sample=clip, schedule=schedule)

    def model(x, t):  # depends on x and t, large enough that the clip is active at times
        return 3.0 * torch.tanh(x) * (1 + t[:, None, None, None].to(x.dtype) / 60)

    got = s.sample(model, (3, 2, 4, 5), generator=gen(7), dtype=dtype)
    g = gen(7)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=dtype)
    for t in range(59, -1, -1):
        x = s.step(model(x, torch.full((3,), t)), t, x, generator=g).prev_sample
    assert got.dtype == dtype
    torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_buffers_stay_float32_and_out_of_state_dict():
    s = DDPMScheduler().to(torch.float16)
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(s.alphas_cumprod, DDPMScheduler().alphas_cumprod, rtol=0, atol=0)
    assert dict(s.named_buffers()).keys() == {"betas", "alphas_cumprod"}
    assert len(s.state_dict()) == 0


X, E = torch.randn(2, 3), torch.randn(2, 3)


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda s: s.add_noise(X, E, 1000), ValueError, r"t: expected a value in \[0, 1000\), got 1000"),
    (lambda s: s.add_noise(X, E, torch.tensor([0, -1])), ValueError, r"t: expected values in \[0, 1000\)"),
    (lambda s: s.add_noise(X, E, torch.tensor([0.5, 1.0])), TypeError, r"t: expected an integer tensor"),
    (lambda s: s.add_noise(X, E, torch.tensor([1, 2, 3])), ValueError, r"t: expected \(\) or \(2,\), got \(3,\)"),
    (lambda s: s.add_noise(X, torch.randn(2, 4), 5), ValueError, r"noise: expected \(2, 3\)"),
    (lambda s: s.step(torch.randn(2, 4), 5, X), ValueError,
     r"eps: expected \(2, 3\) \(the shape of x_t\), got \(2, 4\)"),
    (lambda s: s.step(E, -1, X), ValueError, r"t: expected a value in \[0, 1000\), got -1"),
    (lambda s: s.step(E, 1.5, X), TypeError, r"t: expected an int"),
    (lambda s: s.ddim_step(E, 5, 5, X), ValueError, r"t_prev: expected < t=5, got 5"),
    (lambda s: s.ddim_step(E, 5, -2, X), ValueError, r"t_prev: expected a value in \[-1, 1000\)"),
    (lambda s: s.sample(lambda x, t: x, (2, 3), steps=0), ValueError, r"steps: expected an int in \[1, 1000\], got 0"),
    (lambda s: DDPMScheduler(schedule="cosine"), ValueError, r"schedule: expected one of"),
    (lambda s: DDPMScheduler(num_steps=0), ValueError, r"num_steps: expected >= 1, got 0"),
])
def test_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(DDPMScheduler())
