"""Bad input across the public API: each raises ValueError/TypeError naming the argument (issue 10).

Every case asserts the exception type AND that the message starts with the argument's name and
says what was expected; the valid neighbours of these inputs are checked to still work.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from blockyard.blocks import (
    Attention,
    BottleneckAttention,
    CrossAttention,
    DecoderLevel,
    EncoderLevel,
    FiLM,
    HybridUNO,
    KeyGate,
    MixtureOfExperts,
    ResBlock,
    SoftGate,
    SpectralConv2d,
    UNet,
)
from blockyard.data import BucketBatchSampler, CorruptedStoreError, GroupedStore, rank_batches
from blockyard.losses import dice_loss, gaussian_heatmap, ssim, wta_heatmap_loss

LOGITS = torch.randn(2, 3, 8, 8)
NO_MASK = torch.zeros(2, 8, 8, dtype=torch.bool)
IMG = torch.rand(2, 1, 16, 16)


def centers(*rows):
    return torch.tensor(rows)


class Width(nn.Module):
    """An expert whose output width is only known by running it."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(4, width)

    def forward(self, x):
        return self.lin(x)


def tiny_unet():
    return UNet(1, 1, widths=(4, 8))


CASES = {
    # wta_heatmap_loss / gaussian_heatmap: centres outside the image (NaN at x=50, wrap-around with a mask)
    "wta-x-far": (lambda: wta_heatmap_loss(LOGITS, centers([1, 50], [2, 2])), ValueError,
                  r"centers: expected \(y, x\) inside the 8x8 image .*got \[\[1, 50\]\] at rows \[0\]"),
    "wta-x-edge": (lambda: wta_heatmap_loss(LOGITS, centers([1, 1], [2, 8])), ValueError,
                   r"centers: expected .*0 <= x < 8.*got \[\[2, 8\]\] at rows \[1\]"),
    "wta-negative-masked": (lambda: wta_heatmap_loss(LOGITS, centers([-1, 2], [2, 2]), mask=NO_MASK), ValueError,
                            r"centers: expected .*0 <= y < 8.*got \[\[-1, 2\]\]"),
    "heatmap-outside": (lambda: gaussian_heatmap(centers([0, 0], [5, 0]), (5, 5)), ValueError,
                        r"centers: expected \(y, x\) inside the 5x5 image"),
    "wta-sigma": (lambda: wta_heatmap_loss(LOGITS, centers([1, 1], [2, 2]), sigma=0.0), ValueError,
                  r"sigma: expected > 0, got 0.0"),
    # SpectralConv2d / HybridUNO
    "spectral-int": (lambda: SpectralConv2d(2, 2, 2)(torch.ones(1, 2, 8, 8, dtype=torch.long)), TypeError,
                     r"x: expected a real floating-point tensor, got torch.int64"),
    "spectral-complex": (lambda: SpectralConv2d(2, 2, 2)(torch.ones(1, 2, 8, 8, dtype=torch.cfloat)), TypeError,
                         r"x: expected a real floating-point tensor, got torch.complex64"),
    "spectral-modes-float": (lambda: SpectralConv2d(2, 2, 2.5), TypeError,
                             r"modes: expected a positive int or a pair of them, got 2.5"),
    "spectral-modes-pair-float": (lambda: SpectralConv2d(2, 2, (2, 1.0)), TypeError, r"modes: expected"),
    "spectral-modes-zero": (lambda: SpectralConv2d(2, 2, 0), ValueError, r"modes: expected .*got 0"),
    "spectral-in-zero": (lambda: SpectralConv2d(0, 2, 2), ValueError, r"in_channels: expected an int >= 1, got 0"),
    "uno-hidden-zero": (lambda: HybridUNO(1, 1, hidden=0), ValueError, r"hidden: expected an int >= 1, got 0"),
    "uno-levels-zero": (lambda: HybridUNO(1, 1, levels=0, input_size=16), ValueError,
                        r"levels: expected an int >= 1, got 0"),
    "uno-in-zero": (lambda: HybridUNO(0, 1), ValueError, r"in_channels: expected an int >= 1, got 0"),
    # FiLM / UNet / ResBlock / levels: zero, negative and non-int sizes
    "film-channels-negative": (lambda: FiLM(4, -1), ValueError, r"channels: expected an int >= 1, got -1"),
    "film-cond-dim-zero": (lambda: FiLM(cond_dim=0, channels=4), ValueError, r"cond_dim: expected an int >= 1, got 0"),
    "film-channels-float": (lambda: FiLM(4, 2.0), TypeError, r"channels: expected an int >= 1, got 2.0 \(float\)"),
    "film-cond-int": (lambda: FiLM(3, 2)(torch.randn(2, 2, 4), torch.ones(2, 3, dtype=torch.long)), TypeError,
                      r"cond: expected a floating-point tensor \(torch.float32\), got torch.int64"),
    "unet-in-zero": (lambda: UNet(in_channels=0, out_channels=1), ValueError, r"in_channels: expected an int >= 1"),
    "unet-out-zero": (lambda: UNet(1, 0), ValueError, r"out_channels: expected None or an int >= 1, got 0"),
    "unet-width-zero": (lambda: UNet(1, 1, widths=(4, 0)), ValueError, r"widths\[1\]: expected an int >= 1, got 0"),
    "unet-width-float": (lambda: UNet(1, 1, widths=(4, 8.0)), TypeError, r"widths\[1\]: expected an int"),
    "unet-cond-dim-zero": (lambda: UNet(1, 1, widths=(4,), cond_dim=0), ValueError, r"cond_dim: expected None or"),
    "unet-context-dim-zero": (lambda: UNet(1, 1, widths=(4,), context_dim=0), ValueError,
                              r"context_dim: expected None or an int >= 1"),
    "unet-dropout": (lambda: UNet(1, 1, widths=(4,), dropout=1.0), ValueError,
                     r"dropout: expected a probability in \[0, 1\), got 1.0"),
    "resblock-zero": (lambda: ResBlock(0), ValueError, r"in_channels: expected an int >= 1, got 0"),
    "encoder-level-zero": (lambda: EncoderLevel(0, 4), ValueError, r"in_channels: expected an int >= 1, got 0"),
    "decoder-level-zero": (lambda: DecoderLevel(8, 0, 4), ValueError, r"skip_channels: expected an int >= 1, got 0"),
    # UNet / attention: integer input, float16 input into float32 weights (outside autocast)
    "unet-f16-into-f32": (lambda: tiny_unet()(torch.randn(1, 1, 8, 8).half()), TypeError,
                          r"x: expected torch.float32 \(the parameters' dtype.*got torch.float16"),
    "unet-int": (lambda: tiny_unet()(torch.ones(1, 1, 8, 8, dtype=torch.long)), TypeError,
                 r"x: expected a floating-point tensor \(torch.float32\), got torch.int64"),
    "unet-features-int": (lambda: tiny_unet().features(torch.ones(1, 1, 8, 8, dtype=torch.uint8)), TypeError,
                          r"x: expected a floating-point tensor"),
    "resblock-f16": (lambda: ResBlock(2)(torch.randn(1, 2, 4, 4).half()), TypeError, r"x: expected torch.float32"),
    "decoder-skip-int": (lambda: DecoderLevel(8, 4, 4)(torch.randn(1, 8, 2, 2), torch.ones(1, 4, 4, 4).long()),
                         TypeError, r"skip: expected a floating-point tensor"),
    "attention-f16-into-f32": (lambda: Attention(8, 2)(torch.randn(1, 4, 8).half()), TypeError,
                               r"x: expected torch.float32 .*got torch.float16"),
    "attention-int": (lambda: Attention(8, 2)(torch.ones(1, 4, 8, dtype=torch.long)), TypeError,
                      r"x: expected a floating-point tensor \(torch.float32\), got torch.int64"),
    "attention-bool": (lambda: Attention(8, 2)(torch.ones(1, 4, 8, dtype=torch.bool)), TypeError,
                       r"x: expected a floating-point tensor .*got torch.bool"),
    "cross-attention-context-int": (lambda: CrossAttention(8, 3, 2)(torch.randn(1, 4, 8), torch.ones(1, 2, 3).long()),
                                    TypeError, r"context: expected a floating-point tensor"),
    "bottleneck-attention-f16": (lambda: BottleneckAttention(8, 2)(torch.randn(1, 8, 2, 2).half()), TypeError,
                                 r"x: expected torch.float32"),
    "attention-dim-zero": (lambda: Attention(0, 1), ValueError, r"dim: expected an int >= 1, got 0"),
    "attention-heads-zero": (lambda: Attention(8, 0), ValueError, r"heads: expected an int >= 1, got 0"),
    "cross-attention-context-dim-zero": (lambda: CrossAttention(8, 0, 2), ValueError,
                                         r"context_dim: expected an int >= 1, got 0"),
    # ssim / dice_loss
    "ssim-window-even": (lambda: ssim(IMG, IMG, window_size=4), ValueError,
                         r"window_size: expected an odd int in \[1, min\(H, W\) = 16\], got 4"),
    "ssim-window-zero": (lambda: ssim(IMG, IMG, window_size=0), ValueError, r"window_size: expected an odd int.*got 0"),
    "ssim-window-too-large": (lambda: ssim(IMG, IMG, window_size=17), ValueError,
                              r"window_size: expected an odd int in \[1, min\(H, W\) = 16\], got 17"),
    "ssim-window-float": (lambda: ssim(IMG, IMG, window_size=7.0), TypeError, r"window_size: expected an odd int"),
    "ssim-data-range-zero": (lambda: ssim(IMG, IMG, data_range=0), ValueError,
                             r"data_range: expected None or a number > 0, got 0"),
    "ssim-data-range-negative": (lambda: ssim(IMG, IMG, data_range=-1.0), ValueError, r"data_range: expected"),
    "ssim-data-range-tensor": (lambda: ssim(IMG, IMG, data_range=torch.tensor([1.0, 0.0])), ValueError,
                               r"data_range: expected > 0, got \[1.0, 0.0\]"),
    "ssim-data-range-shape": (lambda: ssim(IMG, IMG, data_range=torch.ones(3)), ValueError,
                              r"data_range: expected a tensor \(\) or \(2,\), got \(3,\)"),
    "ssim-sigma": (lambda: ssim(IMG, IMG, sigma=0.0), ValueError, r"sigma: expected > 0, got 0.0"),
    "dice-target-above": (lambda: dice_loss(torch.randn(1, 1, 4), torch.tensor([[[0.0, 1.0, 2.0, 0.0]]])),
                          ValueError, r"target: expected values in \[0, 1\], got values in \[0.0, 2.0\]"),
    "dice-target-255": (lambda: dice_loss(torch.randn(1, 1, 4), torch.full((1, 1, 4), 255, dtype=torch.uint8)),
                        ValueError, r"target: expected values in \[0, 1\]"),
    "dice-target-negative": (lambda: dice_loss(torch.randn(1, 1, 4), torch.full((1, 1, 4), -0.5)), ValueError,
                             r"target: expected values in \[0, 1\], got values in \[-0.5, -0.5\]"),
    # MoE experts with different output widths
    "moe-linear-widths": (lambda: MixtureOfExperts([nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 2))], SoftGate(4, 2)),
                          ValueError, r"experts: expected the same output width for every expert.*\{0: 3, 1: 2\}"),
    "moe-dense-forward": (lambda: MixtureOfExperts([Width(1), Width(3)], SoftGate(4, 2))(torch.randn(5, 4)),
                          ValueError, r"experts: expected every expert to return .*\(1,\), expert 1 returned \(5, 3\)"),
    "moe-sparse-forward": (lambda: MixtureOfExperts([Width(2), Width(3)], KeyGate(2, 2))(
        torch.randn(4, 4), key=torch.tensor([0, 1, 0, 1])), ValueError,
        r"experts: expected every expert to return .*\(2,\), expert 1 returned \(2, 3\)"),
    # samplers
    "bucket-batch-size-float": (lambda: BucketBatchSampler([0, 0, 1, 1, 1], batch_size=2.5), TypeError,
                                r"batch_size: expected an int, got 2.5 \(float\)"),
    "bucket-world-size-float": (lambda: BucketBatchSampler([0, 1], 2, world_size=2.0), TypeError,
                                r"world_size: expected an int"),
    "rank-batches-float": (lambda: rank_batches(10, 2.5, 0), TypeError, r"batch_size: expected an int, got 2.5"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_the_argument(name):
    call, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        call()


# ---- GroupedStore: empty batch, index of the wrong shape, num_samples that disagrees -----------

def write_store(path):
    samples = [{"x": np.full((2, 3 + i % 2), i, dtype=np.float32), "name": f"s{i}"} for i in range(5)]
    return GroupedStore.write(path, samples)


def edit_index(path, edit):
    index_path = path / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(edit(index)))


def set_key(index, keys, value):
    target = index
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return index


INDEX_EDITS = {
    "not-an-object": (lambda ix: [ix], r"index\.json: expected a JSON object, got list"),
    "num-samples-more": (lambda ix: set_key(ix, ["num_samples"], 7), r"num_samples: 7, but the groups hold 5"),
    "num-samples-fewer": (lambda ix: set_key(ix, ["num_samples"], 4), r"num_samples: 4, but the groups hold 5"),
    "num-samples-string": (lambda ix: set_key(ix, ["num_samples"], "5"), r"num_samples: expected an int >= 0"),
    "groups-object": (lambda ix: set_key(ix, ["groups"], {"a": 1}), r"groups: expected a list, got dict"),
    "group-missing-file": (lambda ix: (ix["groups"][0].pop("file"), ix)[1], r"groups\[0\]: expected \{key, file"),
    "group-start-gap": (lambda ix: set_key(ix, ["groups", 1, "start"], 4), r"groups\[1\]: expected .*start=3"),
    "group-shapes-missing-field": (lambda ix: (ix["groups"][1]["shapes"].pop("name"), ix)[1],
                                   r"groups\[1\]: expected .*shapes of \['name', 'x'\]"),
    "fields-list": (lambda ix: set_key(ix, ["fields"], ["x"]), r"fields: expected"),
    "field-bad-dtype": (lambda ix: set_key(ix, ["fields", "x", "dtype"], "float128"), r"fields: expected"),
    "spatial-not-names": (lambda ix: set_key(ix, ["spatial_fields"], "x"), r"spatial_fields: expected"),
}


@pytest.mark.parametrize("name", list(INDEX_EDITS))
def test_store_index_of_the_wrong_shape_is_corrupted(tmp_path, name):
    write_store(tmp_path / "s")
    edit, match = INDEX_EDITS[name]
    edit_index(tmp_path / "s", edit)
    for verify in (True, False):
        with pytest.raises(CorruptedStoreError, match=match):
            GroupedStore(tmp_path / "s", verify=verify)


def test_store_counts_that_disagree_with_the_files_are_corrupted(tmp_path):
    # count and num_samples consistently one too high: the file holds 3 rows, the index says 4
    write_store(tmp_path / "s")

    def grow(ix):
        ix["groups"][0]["count"] += 1
        ix["groups"][1]["start"] += 1
        ix["num_samples"] += 1
        return ix

    edit_index(tmp_path / "s", grow)
    store = GroupedStore(tmp_path / "s")
    with pytest.raises(CorruptedStoreError, match=r"group_0000_2x3\.safetensors: field .* does not match the index"):
        store[0]


def test_store_empty_batch_and_valid_neighbours(tmp_path):
    store = write_store(tmp_path / "s")
    for empty in ([], np.zeros(0, dtype=np.int64), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"indices: expected at least one index, got 0"):
            store.get_batch(empty)
    with pytest.raises(TypeError, match=r"indices: expected integers, got float64"):
        store.get_batch([0.0, 2.0])
    with pytest.raises(IndexError, match=r"indices: out of range for a store of 5 samples"):
        store.get_batch([5])
    batch = store.get_batch([2, 0])
    assert batch["x"].shape == (2, 2, 3) and batch["name"] == ["s4", "s0"]  # group 0 holds s0, s2, s4
    assert len(store) == 5 and store[4]["name"] == "s3"


# ---- the valid neighbours of the bad inputs keep working ----------------------------------------

def test_valid_neighbours_still_work():
    # centres on every border pixel are inside
    corner = centers([0, 0], [7, 7])
    out = wta_heatmap_loss(LOGITS, corner, mask=NO_MASK)
    assert torch.isfinite(out.loss)
    assert torch.allclose(gaussian_heatmap(corner, (8, 8)).sum((1, 2)), torch.ones(2))
    # an empty batch through the spectral layer (the FFT backends reject it), bias included
    layer = SpectralConv2d(2, 3, (2, 3), bias=True)
    assert layer(torch.randn(0, 2, 8, 8)).shape == (0, 3, 8, 8)
    assert layer(torch.randn(1, 2, 8, 8).bfloat16()).dtype == torch.bfloat16
    assert SpectralConv2d(2, 2, np.int64(2)).modes == (2, 2)
    # numpy ints are ints
    assert FiLM(np.int64(3), 2).channels == 2
    assert len(BucketBatchSampler([0, 0, 1], np.int64(2))) == 2
    # module and input of one dtype: float32, bfloat16 and float16 (CPU float16 works in torch >= 2.1)
    x = torch.randn(1, 1, 8, 8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert tiny_unet().to(dtype)(x.to(dtype)).dtype == dtype
        assert Attention(8, 2).to(dtype)(torch.randn(1, 4, 8, dtype=dtype)).dtype == dtype
    # any floating input under autocast: the ops cast themselves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tiny_unet()(x.half()).shape == (1, 1, 8, 8)
        assert Attention(8, 2)(torch.randn(1, 4, 8)).dtype == torch.bfloat16
    # ssim with the largest odd window, tensor data_range; dice with bool and soft targets
    assert torch.allclose(ssim(IMG, IMG, window_size=15, data_range=torch.ones(2)), torch.tensor(1.0))
    assert torch.isfinite(dice_loss(torch.randn(2, 1, 4), torch.rand(2, 1, 4) > 0.5))
    dice_loss(torch.randn(0, 1, 4), torch.rand(0, 1, 4))  # an empty target skips the range check
    # experts of one width: construction passes for Linear and for modules that do not declare it
    moe = MixtureOfExperts([nn.Linear(4, 3), Width(3)], KeyGate(2, 2))
    assert moe(torch.randn(4, 4), key=torch.tensor([0, 1, 1, 0])).output.shape == (4, 3)


def test_range_checks_compile_without_graph_break():
    # under torch.compile the data-dependent checks are device asserts: no host sync, no graph break
    def loss(logits, ctrs, logits2, target):
        return wta_heatmap_loss(logits, ctrs).loss + dice_loss(logits2, target)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    args = (LOGITS, centers([1, 1], [7, 0]), torch.randn(2, 1, 5), torch.rand(2, 1, 5))
    torch.testing.assert_close(compiled(*args), loss(*args))
    with pytest.raises(RuntimeError, match=r"centers: expected \(y, x\) inside the 8x8 image"):
        compiled(LOGITS, centers([1, 1], [7, 9]), *args[2:])
    with pytest.raises(RuntimeError, match=r"target: expected values in \[0, 1\]"):
        compiled(*args[:3], args[3] + 1.5)
