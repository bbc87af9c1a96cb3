"""FusionNet's levels (the seed's Change 2: 4 poolings, 8x8 bottleneck, 4 FiLM-conditioned decoder levels), its
parameter count against the seed's, and the history embeddings' grid limit."""
from __future__ import annotations

import pytest
import torch
from fusion.encoding import HISTORY, IN_CHANNELS
from fusion.model import N_ACTIONS, FusionNet, HistoryEncoder

from blockyard.blocks import FiLM, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(batch: int, height: int, width: int, length: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, IN_CHANNELS, height, width, generator=g)
    history = torch.stack([torch.randint(0, N_ACTIONS, (batch, HISTORY), generator=g),
                           torch.randint(0, height - 2, (batch, HISTORY), generator=g),
                           torch.randint(0, width - 2, (batch, HISTORY), generator=g),
                           torch.randint(0, 60, (batch, HISTORY), generator=g),
                           torch.randint(0, 60, (batch, HISTORY), generator=g)], -1).float()
    return x, history, torch.full((batch,), length), torch.full((batch,), 60)


@pytest.mark.parametrize(("levels", "bottleneck", "film_sizes"), [(4, 8, [16, 32, 64, 128]), (3, 16, [32, 64, 128])])
def test_levels_set_the_bottleneck_and_the_film_conditioned_decoder_levels(levels, bottleneck, film_sizes):
    """128x128 input: levels=4 (the seed's) pools to 8x8 and conditions 4 decoder levels by FiLM; levels=3 stops
    at 16x16 with 3."""
    torch.manual_seed(0)
    net = FusionNet(widths=(8, 16, 16, 16), levels=levels, rnn_hidden=16).eval()
    with torch.no_grad():  # as if trained: every FiLM now acts on its map
        for film in net.modules():
            if isinstance(film, FiLM):
                film.proj.weight.normal_(0, 0.5)
    seen = {"mid": [], "attn": [], "film": []}
    net.mid.register_forward_hook(lambda m, a, out: seen["mid"].append(tuple(a[0].shape)))
    net.mid_attn.register_forward_hook(lambda m, a, out: seen["attn"].append(tuple(a[0].shape)))
    for film in (m for m in net.decoders.modules() if isinstance(m, FiLM)):
        film.register_forward_hook(lambda m, a, out: seen["film"].append((a[0].shape[-1], a[1].shape, out)))
    x, history, length, initial = inputs(2, 128, 128)
    out = net(x, history, length, initial)
    assert out.position.shape == (2, 4, 128, 128) and out.action.shape == (2, N_ACTIONS, 128, 128)
    assert seen["mid"] == [(2, 16, bottleneck, bottleneck)] == seen["attn"]
    assert len(net.decoders) == levels == sum(isinstance(m, FiLM) for m in net.modules())
    assert [size for size, _, _ in seen["film"]] == film_sizes
    assert all(cond == (2, 16) for _, cond, _ in seen["film"])
    # every FiLM is conditioned by the history: another history changes each level's output
    seen["film"].clear()
    net(x, inputs(2, 128, 128, seed=1)[1], length, initial)
    first, second = seen["film"][:levels], seen["film"][levels:]
    assert all(not torch.allclose(a[2], b[2]) for a, b in zip(first, second))


def test_seed_widths_have_the_seeds_parameters_part_by_part():
    """FusionNet v2 at widths 48,96,192,192, K=4, GRU 192 (the seed's fusion_model.py, counted analytically)."""
    net = FusionNet(widths=(48, 96, 192, 192), levels=4, rnn_hidden=192)

    def without_film(module):
        return count_parameters(module) - sum(count_parameters(m) for m in module.modules() if isinstance(m, FiLM))

    assert [count_parameters(e) for e in net.encoders] == [42_192, 171_072, 683_136, 701_568]
    assert count_parameters(net.mid) == 664_320
    assert [without_film(d) for d in net.decoders] == [738_432, 203_328, 50_976, 46_368]  # dec4 .. dec1
    assert [d.out_channels for d in net.decoders] == [192, 96, 48, 48]
    assert count_parameters(net.history) == 384_512
    assert (count_parameters(net.position_head), count_parameters(net.action_head)) == (31_348, 21_420)
    # two known differences: per-level FiLM projections without bias (the seed: one Linear(192, 768) with bias,
    # 148,224) and no qkv bias in the attention (the seed's nn.MultiheadAttention has 576)
    films = sum(count_parameters(m) for m in net.modules() if isinstance(m, FiLM))
    assert films == 148_224 - 768 and count_parameters(net.mid_attn) == 148_608 - 576
    assert count_parameters(net) == 4_035_504 - 768 - 576


def test_levels_3_is_the_default_and_the_cpu_model_of_the_readme():
    assert count_parameters(FusionNet(widths=(16, 32, 64, 64), levels=3, rnn_hidden=64)) == 456_144
    assert FusionNet().levels == 3 and FusionNet(widths=(8, 8, 8)).levels == 2


@pytest.mark.parametrize("levels", [2, 5, 0])
def test_levels_other_than_len_or_len_minus_one_are_refused(levels):
    with pytest.raises(ValueError, match=r"levels: expected 4 or 3 poolings for 4 widths"):
        FusionNet(widths=(8, 8, 8, 8), levels=levels)


def test_a_grid_beyond_the_embedding_is_refused():
    net = FusionNet(widths=(8, 8, 8, 8), rnn_hidden=16, max_grid=32).eval()
    assert net(*inputs(1, 32, 24)).position.shape == (1, 4, 32, 24)  # the largest grid the tables cover
    for height, width in ((40, 24), (24, 33)):
        with pytest.raises(ValueError, match=rf"at most 32x32 \(max_grid.*got {height}x{width}"):
            net(*inputs(1, height, width))


def test_history_coordinates_past_the_table_fail_instead_of_being_clamped():
    enc = HistoryEncoder(hidden=8, max_grid=32)
    history = torch.zeros(1, HISTORY, 5)
    history[0, 0, 1] = 32  # one past the y table: the first version silently used row 31
    with pytest.raises(IndexError, match="index out of range"):
        enc(history, torch.tensor([1]), torch.tensor([10]))


def test_a_bottleneck_of_single_value_groups_is_refused():
    """16x16 at levels=4 pools to 1x1: with 8 channels in 8 GroupNorm groups every group would hold one value."""
    x, history, length, initial = inputs(1, 16, 16)
    with pytest.raises(ValueError, match="pools to 1 cell at levels=4, where each GroupNorm group"):
        FusionNet(widths=(8, 8, 8, 8), levels=4, rnn_hidden=16).eval()(x, history, length, initial)
    out = FusionNet(widths=(8, 8, 16, 16), levels=4, rnn_hidden=16).eval()(x, history, length, initial)
    assert out.position.shape == (1, 4, 16, 16)  # two channels per group: a real normalisation
    assert FusionNet(widths=(8, 8, 8, 8), levels=3, rnn_hidden=16)(*inputs(1, 16, 16)).position.shape == (1, 4, 16, 16)
