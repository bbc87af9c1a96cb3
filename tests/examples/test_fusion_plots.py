"""FusionNet's figures, inspected as matplotlib objects: integer epoch ticks, baselines readable on
the accuracy axis (not flattened onto it), a colour bar on every heatmap panel, rows labelled by
their zone pattern, and the panels computed from the model's maps."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fusion.batches import Batch
from fusion.encoding import legal_anchor_mask, state_channels
from fusion.grid import ZONE_PATTERNS, init_path, make_zones
from fusion.plots import ACCURACIES, BASELINES, HeatmapPanels, curves_figure, heatmap_panels, heatmaps_figure

plt = pytest.importorskip("matplotlib.pyplot")


def records(epochs: int = 3) -> list[dict]:
    """Epoch records with the README's orders of magnitude: model 5-11%, baselines 0.6-1%."""
    out = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "train_loss": 9.0 - e, "loss": 9.5 - e, "pos_acc_top1": 0.03 * e + 0.02,
             "pos_acc_top5": 0.1 * e, "oracle_acc_top1": 0.05 * e, "act_acc_at_gt": 0.5 + 0.05 * e,
             "baseline_freq_top1": 0.010, "baseline_uniform_top1": 0.006, "baseline_act_acc": 0.35}
        out.append(r)
    return out


def _axes_fraction(ax, x: float, y: float) -> float:
    """Height of data point (x, y) above the axis' bottom, as a fraction of the axis height."""
    return float(ax.transAxes.inverted().transform(ax.transData.transform((x, y)))[1])


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_curves_epoch_ticks_are_whole_epochs(epochs):
    fig = curves_figure(records(epochs))
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    plt.close(fig)


def test_baselines_are_not_flattened_on_the_accuracy_axis():
    recs = records()
    fig = curves_figure(recs)
    fig.canvas.draw()
    ax = next(a for a in fig.axes if a.get_title() == "accuracy vs baselines")
    last = recs[-1]
    heights = {key: _axes_fraction(ax, last["epoch"], last[key]) for key, _ in BASELINES}
    heights |= {key: _axes_fraction(ax, last["epoch"], last[key]) for key, _, _ in ACCURACIES}
    # every baseline sits well above the x axis, inside the plot, and apart from the model's top-1
    for key, _ in BASELINES:
        assert 0.05 < heights[key] < 1.0, (key, heights[key])
    assert heights["pos_acc_top1"] - heights["baseline_freq_top1"] > 0.15
    # 0.6% and 1.0% are told apart (on a linear 0-1 axis they were 0.004 of the height apart)
    assert heights["baseline_freq_top1"] - heights["baseline_uniform_top1"] > 0.04
    labels = {t.get_text() for t in ax.texts}
    assert {"1.0%", "0.6%", "35.0%"} <= labels
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {f"baseline: {label}" for _, label in BASELINES} <= legend
    plt.close(fig)


def synthetic_panels(patterns: list[str], h: int = 6, w: int = 8) -> HeatmapPanels:
    n = len(patterns)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, n, h, w, generator=g)
    maps = maps / maps.flatten(2).sum(-1)[..., None, None]
    state = torch.rand(n, 4, h, w, generator=g).round()
    return HeatmapPanels(state, maps[0], maps[1], maps[2], torch.arange(n), torch.tensor([[1, 2]] * n), patterns)


def test_heatmaps_have_colour_bars_and_rows_name_their_zone_pattern():
    patterns = ["stripes", "islands", "voronoi"]
    fig = heatmaps_figure(synthetic_panels(patterns))
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 4 * len(patterns)
    for ax in images:
        assert ax.images[0].colorbar is not None, ax.get_title()
    colorbar_axes = [ax for ax in fig.axes if not ax.images]
    assert len(colorbar_axes) == len(images)
    grid = np.array(images).reshape(len(patterns), 4)
    for row, pattern in zip(grid, patterns):
        assert pattern in row[0].get_ylabel() and "6x8" in row[0].get_ylabel()
        assert row[0].get_title().startswith(pattern)
        others = [p for p in patterns if p != pattern]
        assert not any(p in row[0].get_ylabel() for p in others)
    plt.close(fig)


class TwoHypotheses(torch.nn.Module):
    """Hypothesis 0 peaks at ``good`` (the target), hypothesis 1 at ``bad``: the WTA winner is 0."""

    def __init__(self, good: tuple[int, int], bad: tuple[int, int]) -> None:
        super().__init__()
        self.good, self.bad = good, bad

    def forward(self, x, history, history_len, initial_crossings):
        b, _, h, w = x.shape
        logits = torch.zeros(b, 2, h, w)
        logits[:, 0, self.good[0], self.good[1]] = 6.0
        logits[:, 1, self.bad[0], self.bad[1]] = 6.0
        logits[:, 1, self.good[0], self.good[1]] = 1.0
        return SimpleNamespace(position=logits)


def _batch(patterns: list[int], h: int = 6, w: int = 8) -> tuple[Batch, tuple[int, int], tuple[int, int]]:
    """Real grid states (field by field, whatever fields Batch has), and two anchors legal in all of them."""
    names = [ZONE_PATTERNS[p] if p < len(ZONE_PATTERNS) else "left_right" for p in patterns]
    state = torch.from_numpy(np.stack([
        state_channels(make_zones(w, h, name, rng=np.random.default_rng(0)), *init_path(w, h, "zigzag"))
        for name in names]))
    legal = torch.nonzero(legal_anchor_mask(state, None).logical_not().all(0)).tolist()
    good, bad = tuple(legal[0]), tuple(legal[-1])
    n = len(patterns)
    values = {"state": state, "target": torch.tensor([[*good, 0]] * n),
              "ops": torch.zeros(n, 3, h, w, dtype=torch.uint8), "history": torch.zeros(n, 32, 5),
              "history_len": torch.zeros(n, dtype=torch.long), "initial_crossings": torch.ones(n, dtype=torch.long),
              "pattern": torch.tensor(patterns), "perturbed": torch.zeros(n, dtype=torch.bool), "pad_mask": None}
    return Batch(**{field: values[field] for field in Batch._fields}), good, bad


def test_heatmap_panels_pick_the_winning_hypothesis_and_name_each_pattern():
    batch, good, bad = _batch([ZONE_PATTERNS.index("islands"), ZONE_PATTERNS.index("stripes"), len(ZONE_PATTERNS)])
    assert good != bad
    model = TwoHypotheses(good, bad)
    panels = heatmap_panels(model, batch, n=3)
    assert panels.patterns == ["islands", "stripes", "unknown pattern"]
    assert panels.best.tolist() == [0, 0, 0]
    # the best map is hypothesis 0's softmax (peak at the target), the merged map the max over both
    assert panels.best_map[:, good[0], good[1]].min() > 0.5 and panels.best_map[:, bad[0], bad[1]].max() < 0.01
    assert panels.merged[:, bad[0], bad[1]].min() > 0.5
    torch.testing.assert_close(panels.best_map.flatten(1).sum(-1), torch.ones(3))
    assert panels.target[0].flatten().argmax().item() == good[0] * 8 + good[1]
    fig = heatmaps_figure(heatmap_panels(model, batch, n=2))
    assert len([ax for ax in fig.axes if ax.images]) == 8
    plt.close(fig)
