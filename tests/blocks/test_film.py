import pytest
import torch

from blockyard.blocks import FiLM


def reference(film, x, cond):  # the published formula, per sample and channel
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        params = film.proj.weight @ cond[b] + film.proj.bias
        gamma, beta = params[: film.channels], params[film.channels:]
        for c in range(film.channels):
            out[b, c] = x[b, c] * (1 + gamma[c]) + beta[c]
    return out


@pytest.mark.parametrize("spatial", [(), (7,), (4, 5), (2, 3, 4)])
def test_identity_at_init_for_any_trailing_dims(spatial):
    film = FiLM(6, 3)
    x = torch.randn(2, 3, *spatial)
    torch.testing.assert_close(film(x, torch.randn(2, 6)), x, rtol=0, atol=0)


@pytest.mark.parametrize("spatial", [(), (7,), (4, 5), (2, 3, 4)])
def test_matches_formula_after_random_init(spatial):
    film = FiLM(6, 3)
    with torch.no_grad():
        film.proj.weight.normal_()
        film.proj.bias.normal_()
    x, cond = torch.randn(2, 3, *spatial), torch.randn(2, 6)
    y = film(x, cond)
    torch.testing.assert_close(y, reference(film, x, cond))
    assert not torch.allclose(y, x)
    film.reset_parameters()
    torch.testing.assert_close(film(x, cond), x, rtol=0, atol=0)


def test_grad_leaves_identity_after_one_step():
    film = FiLM(4, 3)
    x, cond = torch.randn(2, 3, 5, 5), torch.randn(2, 4, requires_grad=True)
    target = 2 * x + 1  # reachable: gamma = 1, beta = 1
    (film(x, cond) - target).pow(2).mean().backward()
    # zero init must not kill the gradient of the projection (d y / d gamma = x, d y / d beta = 1)
    assert film.proj.weight.grad.abs().sum() > 0 and film.proj.bias.grad.abs().sum() > 0
    assert torch.equal(cond.grad, torch.zeros(2, 4))  # zero here (W = 0), but connected
    torch.optim.SGD(film.parameters(), lr=0.1).step()
    assert film.proj.weight.abs().sum() > 0
    # After one real step the output moved off the identity, and differs between two conds.
    with torch.no_grad():
        y = film(x, cond)
        assert not torch.allclose(y, x)
        other = film(x, torch.randn(2, 4))
        assert (other - y).abs().max() > 1e-3
        torch.testing.assert_close(y, reference(film, x, cond))
    assert (film(x, cond) - target).pow(2).mean() < (x - target).pow(2).mean()  # and towards the target


def test_bf16_autocast_runs():
    film = FiLM(4, 3)
    with torch.no_grad():
        film.proj.weight.normal_()
    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = film(x, cond)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), film(x, cond), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("cond_shape", [(2, 5), (3, 4), (4,), (2, 4, 1)])
def test_rejects_bad_cond_shape(cond_shape):
    with pytest.raises(ValueError, match=r"cond: expected \(2, 4\)"):
        FiLM(4, 3)(torch.randn(2, 3, 5, 5), torch.randn(*cond_shape))


@pytest.mark.parametrize("shape", [(2,), (2, 4, 5, 5)])
def test_rejects_bad_x_shape(shape):
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, \*spatial\)"):
        FiLM(4, 3)(torch.randn(*shape), torch.randn(2, 4))


@pytest.mark.slow  # first inductor compile of a process (cold cache: ~20 s CPU)
def test_compiles_fullgraph():
    film = FiLM(4, 3)
    with torch.no_grad():
        film.proj.weight.normal_()
    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 4)
    torch.testing.assert_close(torch.compile(film, fullgraph=True)(x, cond), film(x, cond))
