import pytest
import torch
from torch import nn

from blockyard.blocks import SpectralConv2d, count_parameters


def test_counts_real_scalars_by_hand():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert count_parameters(net) == 3 * 4 + 4 + 4 * 2
    net[0].weight.requires_grad_(False)
    assert count_parameters(net) == 4 + 4 * 2
    assert count_parameters(net, trainable_only=False) == 3 * 4 + 4 + 4 * 2


def test_complex_parameter_counts_two_per_element():
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(3, 5, dtype=torch.complex64))
    assert count_parameters(module) == 2 * 15
    spectral = SpectralConv2d(2, 3, (4, 5))  # complex weights stored as real views (..., 2)
    expected = sum(p.numel() for p in spectral.parameters())
    assert count_parameters(spectral) == expected


def test_shared_parameters_count_once_and_wrappers_do_not_change_the_count():
    lin = nn.Linear(2, 2)
    tied = nn.Sequential(lin, lin)
    assert count_parameters(tied) == 6
    assert count_parameters(torch.compile(tied)) == 6  # never called: no compilation


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"module: expected an nn\.Module, got Tensor"):
        count_parameters(torch.zeros(3))
