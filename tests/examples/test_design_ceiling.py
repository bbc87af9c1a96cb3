"""Design decomposition: the Bayes ceilings against a naive enumeration and against sampled designs."""
import itertools
import math

import numpy as np
import pytest
from design import tables
from design.ceiling import bayes_ceiling, bayes_predict, joint_table
from design.latents import sample_latents

N = 20_000


@pytest.fixture(scope="module")
def sampled():
    lat = [sample_latents(np.random.default_rng([11, i])) for i in range(N)]
    z = np.array([x.revealed() for x in lat])
    return z, np.array([x.goal for x in lat]), np.array([x.format for x in lat]), np.array([x.tone for x in lat])


def naive_goal_side(g, palette, cta, body, images):
    """P(g, palette, cta, body, images) by a loop over tone bins, from the tables' prose definitions."""
    lo, hi = tables.TONE_RANGE[g]
    total = 0.0
    for b in range(tables.TONE_BINS):
        overlap = max(0.0, min(hi, (b + 1) / tables.TONE_BINS) - max(lo, b / tables.TONE_BINS)) / (hi - lo)
        total += overlap * tables.PALETTE_GIVEN_TONE_BIN[b][palette]
    p_cta = tables.CTA_GIVEN_GOAL[g] if cta else 1 - tables.CTA_GIVEN_GOAL[g]
    return tables.GOAL_PRIOR[g] * total * p_cta * tables.BODY_GIVEN_GOAL[g][body] * tables.IMAGES_GIVEN_GOAL[g][images]


def test_ceilings_match_a_naive_enumeration_and_the_baselines():
    goal_acc = sum(max(naive_goal_side(g, *cell) for g in range(10))
                   for cell in itertools.product(range(6), range(2), range(4), range(3)))
    format_acc = 0.0
    for layout, sub in itertools.product(range(4), range(2)):
        format_acc += max(tables.FORMAT_PRIOR[f] * tables.LAYOUT_GIVEN_FORMAT[f][layout]
                          * (tables.SUBHEADLINE_GIVEN_FORMAT[f] if sub else 1 - tables.SUBHEADLINE_GIVEN_FORMAT[f])
                          for f in range(4))
    c = bayes_ceiling()
    assert c.goal_accuracy == pytest.approx(goal_acc, abs=1e-12)
    assert c.format_accuracy == pytest.approx(format_acc, abs=1e-12)
    assert (c.goal_chance, c.format_chance) == (0.1, 0.25)
    assert (c.goal_majority, c.format_majority) == (tables.GOAL_PRIOR.max(), 0.3)
    # the design targets: clearly below 1, well above the baselines
    assert 0.55 < c.goal_accuracy < 0.65 and 0.88 < c.format_accuracy < 0.93
    assert joint_table().sum() == pytest.approx(1.0, abs=1e-12)


def test_bayes_classifier_on_sampled_latents_reaches_the_ceiling(sampled):
    z, goal, fmt, tone = sampled
    c = bayes_ceiling()
    pred = bayes_predict(z)
    for acc, exact in (((pred.goal == goal).mean(), c.goal_accuracy), ((pred.format == fmt).mean(), c.format_accuracy)):
        assert abs(acc - exact) < 4 * math.sqrt(exact * (1 - exact) / N)
    err = (pred.tone - tone) ** 2
    assert abs(err.mean() - c.tone_mse) < 4 * err.std() / math.sqrt(N)
    assert abs(tone.var() - c.tone_variance) < 4 * ((tone - tone.mean()) ** 2).std() / math.sqrt(N)


@pytest.mark.parametrize("axes", [(0, 2), (0, 5), (0, 6), (0, 7), (1, 3), (1, 4)])
def test_sampled_pairs_follow_the_joint_table(sampled, axes):
    """goal with palette, cta, body, images; format with layout, subheadline: every cell within 5 sigma."""
    z, goal, fmt, _ = sampled
    columns = {0: goal, 1: fmt, **{k + 2: z[:, k] for k in range(6)}}
    joint = joint_table()
    keep = tuple(i for i in range(joint.ndim) if i not in axes)
    table = joint.sum(axis=keep)
    counts = np.zeros_like(table)
    np.add.at(counts, (columns[axes[0]], columns[axes[1]]), 1)
    assert (np.abs(counts / N - table) <= 5 * np.sqrt(table * (1 - table) / N) + 1 / N).all()


def test_bayes_predict_rejects_bad_latents():
    with pytest.raises(ValueError, match=r"latents: expected \(N, 6\) integers"):
        bayes_predict(np.zeros((3, 5), np.int64))
    with pytest.raises(ValueError, match="latents: expected each column below"):
        bayes_predict(np.array([[6, 0, 0, 0, 0, 0]]))
