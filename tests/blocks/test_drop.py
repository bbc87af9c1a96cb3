import pytest
import torch

from blockyard.blocks import DropPath, drop_path


def test_identity_in_eval_and_at_p0():
    x = torch.randn(8, 3, 4)
    dp = DropPath(0.5).eval()
    assert dp(x) is x
    assert DropPath(0.0).train()(x) is x
    assert drop_path(x, 0.5, training=False) is x


def test_zeroes_whole_samples_and_rescales_the_rest():
    p = 0.4
    x = torch.randn(256, 3, 4, 5)
    y = DropPath(p).train()(x)
    flat_x, flat_y = x.flatten(1), y.flatten(1)
    dropped = (flat_y == 0).all(1)
    kept = ~dropped
    torch.testing.assert_close(flat_y[kept], flat_x[kept] / (1 - p))
    assert 0 < dropped.sum() < 256
    # dropped fraction near p: binomial(256, 0.4) has std ~7.8
    assert abs(dropped.sum().item() - p * 256) < 4 * (256 * p * (1 - p)) ** 0.5


def test_expectation_is_preserved():
    p = 0.3
    x = torch.randn(1, 6)
    samples = drop_path(x.expand(40000, 6), p, training=True)
    # each sample is 0 or x/0.7: the mean's std is |x| * sqrt(p/(1-p)/n) ~ 0.0033 |x|
    torch.testing.assert_close(samples.mean(0, keepdim=True), x, rtol=0.02, atol=0.01)


def test_p1_gives_zeros_without_nan():
    x = torch.randn(4, 3)
    y = DropPath(1.0).train()(x)
    assert torch.equal(y, torch.zeros_like(x))


def test_generator_makes_it_reproducible():
    x = torch.randn(64, 2)
    a = drop_path(x, 0.5, training=True, generator=torch.Generator().manual_seed(1))
    b = drop_path(x, 0.5, training=True, generator=torch.Generator().manual_seed(1))
    c = drop_path(x, 0.5, training=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_grad_flows_only_through_kept_samples_and_dtype_is_kept():
    x = torch.randn(32, 5, requires_grad=True)
    y = drop_path(x, 0.5, training=True, generator=torch.Generator().manual_seed(0))
    y.sum().backward()
    kept = (y != 0).all(1)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x[kept], 2.0))
    assert torch.equal(x.grad[~kept], torch.zeros_like(x[~kept]))
    assert DropPath(0.2).train()(torch.randn(4, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p: expected a probability"):
        DropPath(p)
    with pytest.raises(ValueError, match="p: expected a probability"):
        drop_path(torch.randn(2, 3), p, training=True)
