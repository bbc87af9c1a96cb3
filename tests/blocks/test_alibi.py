import math

import pytest
import torch

from blockyard.blocks import alibi_bias, alibi_slopes


def press_get_slopes(n):
    """`get_slopes` of the paper's reference code (ofirpress/attention_with_linear_biases), verbatim."""
    def get_slopes_power_of_2(n):
        start = (2 ** (-2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + press_get_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2])


def bloom_slopes(n):
    """HF BLOOM's `build_alibi_tensor` slopes: powers of a base, then odd powers of a finer base."""
    closest = 2 ** math.floor(math.log2(n))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, 1 + closest)]
    if closest != n:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** p for p in range(1, 1 + 2 * (n - closest), 2)]
    return slopes


def test_slopes_for_8_and_16_heads_are_the_published_values():
    # the paper, section 3: "For models with 8 heads, the slopes that we used are the geometric sequence
    # 1/2^1, 1/2^2, ..., 1/2^8"; for 16 heads the 8-head slopes interpolated by geometric averages
    assert alibi_slopes(8, dtype=torch.float64).tolist() == [2.0 ** -k for k in range(1, 9)]
    torch.testing.assert_close(alibi_slopes(16, dtype=torch.float64),
                               torch.tensor([2.0 ** (-k / 2) for k in range(1, 17)], dtype=torch.float64),
                               rtol=1e-14, atol=0)


def test_non_power_of_two_heads_follow_the_reference_code():
    expected = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    for heads in range(1, 41):
        ours = alibi_slopes(heads, dtype=torch.float64)
        torch.testing.assert_close(ours, torch.tensor(press_get_slopes(heads), dtype=torch.float64),
                                   rtol=1e-14, atol=0)
        torch.testing.assert_close(ours, torch.tensor(bloom_slopes(heads), dtype=torch.float64),
                                   rtol=1e-14, atol=0)


def test_slopes_dtype_and_device_defaults():
    assert alibi_slopes(4).dtype == torch.get_default_dtype()
    assert alibi_slopes(4, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bias_is_minus_slope_times_distance_per_head_and_sample():
    slopes = torch.tensor([0.5, 0.25, 0.125])
    dist = torch.rand(2, 4, 5) * 3  # batched, Nq != Nk
    bias = alibi_bias(dist, slopes)
    assert bias.shape == (2, 3, 4, 5)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(5):
                    assert bias[b, h, i, j].item() == pytest.approx(-slopes[h].item() * dist[b, i, j].item())
    torch.testing.assert_close(alibi_bias(dist[1], slopes), bias[1])


def test_token_distances_give_the_papers_bias_matrix():
    # symmetric ALiBi over a sequence: row i of head h is -m_h * |i - j|
    p = torch.arange(5.0)
    bias = alibi_bias((p[:, None] - p[None, :]).abs(), alibi_slopes(8))
    assert bias[0, 2].tolist() == [-1.0, -0.5, 0.0, -0.5, -1.0]
    assert bias[7, 0].tolist() == [0.0, -1 / 256, -2 / 256, -3 / 256, -4 / 256]


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: alibi_slopes(0), ValueError, r"heads: expected an int >= 1, got 0"),
    (lambda: alibi_slopes(2.5), TypeError, r"heads: expected an int >= 1, got 2.5"),
    (lambda: alibi_bias(torch.ones(3, 3, dtype=torch.long), alibi_slopes(2)), TypeError,
     r"distances: expected a floating-point tensor, got torch.int64"),
    (lambda: alibi_bias(torch.ones(3), alibi_slopes(2)), ValueError,
     r"distances: expected \(Nq, Nk\) or \(B, Nq, Nk\), got \(3,\)"),
    (lambda: alibi_bias(torch.ones(3, 3), torch.ones(2, 1)), ValueError,
     r"slopes: expected a floating \(H,\) tensor with H >= 1, got torch.float32 \(2, 1\)"),
])
def test_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.slow
def test_bias_compiles_fullgraph():
    dist, slopes = torch.rand(2, 5, 5), alibi_slopes(4)
    compiled = torch.compile(alibi_bias, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(dist, slopes), alibi_bias(dist, slopes))
