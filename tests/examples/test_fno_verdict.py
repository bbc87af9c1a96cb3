"""The FNO stability plan's decision logic on hand-made tables: gold, silver, pivot, undecided, and each condition."""
from __future__ import annotations

import math

import pytest
from fno.verdict import plan_verdict, stage_a_winner


def row(failures=0, best=0.10, ssim=0.80, n=5, kinds=None, worst=12.0):
    """One arm's table row in the shape fno_shootout.summarize writes (medians over the successful runs)."""
    ok = n - failures
    return {"n": n, "failures": failures, "failure_kinds": kinds if kinds is not None else ["diverged"] * failures,
            "best_val": {"median": best if ok else math.nan}, "amp_ssim": {"median": ssim if ok else math.nan},
            "grad_norm": {"worst": worst}}


def table(control=None, arch=None, agc=None, **extra):
    rows = {"hybrid": control or row(failures=2, best=0.100), "stable_zero_gamma": arch or row(failures=0, best=0.080),
            "hybrid_agc": agc or row(failures=1, best=0.105)}
    return {**rows, **extra}


DEEP_OK = {6: row(failures=0, best=0.085, ssim=0.78)}


def checks(verdict) -> dict:
    return {c.name: c.passed for c in verdict.checks}


def test_gold_when_the_architectural_fix_passes_both_stages():
    v = plan_verdict(table(), DEEP_OK)
    assert v.verdict == "gold" and v.winner == "stable_zero_gamma"
    assert v.reasons == ["the architectural fix passes Stage A and Stage B"]
    assert all(checks(v).values())


def test_stage_b_failure_or_absence_stops_gold():
    nan_at_depth = {6: row(failures=1, kinds=["non-finite"], best=0.08, worst=math.nan)}
    v = plan_verdict(table(), nan_at_depth)
    assert v.verdict == "silver"  # the fix fails Stage B; AGC: 1/5 < 2/5 failures, 0.105 <= 1.1 x 0.100
    assert "the architectural fix passes Stage A but fails Stage B" in v.reasons
    assert not checks(v)["stage B 6 levels: no NaNs"] and not checks(v)["stage B 6 levels: gradient norm bounded"]
    worse = {6: row(failures=0, best=0.080 * 1.11)}  # more than 10% above its Stage A median
    assert plan_verdict(table(), worse).verdict == "silver"
    assert plan_verdict(table(), {6: row(best=0.080 * 1.09)}).verdict == "gold"  # within the plan's 10%
    assert plan_verdict(table(), {6: row(best=0.08, ssim=0.80 * 0.89)}).verdict == "silver"  # SSIM dropped > 10%
    for missing in (None, {}):
        v = plan_verdict(table(), missing)
        assert v.verdict == "undecided"
        assert v.reasons == ["the architectural fix passes Stage A, but Stage B did not run"]
    v = plan_verdict(table(), DEEP_OK, stage_b_arm="hybrid")
    assert v.verdict == "undecided" and "Stage B ran hybrid, not it" in v.reasons[0]


def test_silver_when_only_agc_lowers_the_failure_rate_within_ten_percent():
    v = plan_verdict(table(arch=row(failures=0, best=0.2)), DEEP_OK)
    assert v.verdict == "silver"
    assert v.reasons[:2] == ["the architectural fix fails Stage A",
                             "architectural fix: lowest median loss (vs control): median best val stable_zero_gamma "
                             "0.2 vs hybrid 0.1"]
    assert v.reasons[-1] == "AGC lowers the failure rate without a >10% median-loss regression"
    edge = plan_verdict(table(arch=row(best=0.2), agc=row(failures=1, best=0.11)))  # exactly 1.1 x the control
    assert edge.verdict == "silver"


@pytest.mark.parametrize("agc, unmet", [
    (row(failures=1, best=0.1101), "AGC: median loss not worse than the control's by more than 10%"),
    (row(failures=2, best=0.090), "AGC: lower failure rate than the control"),  # equal failures: not lower
])
def test_pivot_when_neither_fix_meets_its_condition(agc, unmet):
    v = plan_verdict(table(arch=row(failures=3, best=0.09), agc=agc))
    assert v.verdict == "pivot"
    assert not checks(v)["architectural fix: lower failure rate than the control"]
    assert any(r.startswith(unmet) for r in v.reasons) and "AGC does not meet its condition" in v.reasons


def test_a_control_that_never_fails_rules_gold_out():
    """The plan's gold needs a *lower* failure rate than the control: none exists below 0 failures."""
    v = plan_verdict(table(control=row(failures=0, best=0.1), arch=row(failures=0, best=0.05),
                           agc=row(failures=0, best=0.2)), DEEP_OK)
    assert checks(v)["architectural fix: lowest failure rate (vs AGC)"] is True  # tied at 0: lowest
    assert checks(v)["architectural fix: lower failure rate than the control"] is False
    assert v.verdict == "pivot"


def test_nans_fail_the_architectural_fix_even_when_it_is_best_otherwise():
    v = plan_verdict(table(arch=row(failures=1, kinds=["non-finite"], best=0.05)), DEEP_OK)
    assert checks(v)["architectural fix: no NaNs"] is False
    assert v.verdict == "silver"


def test_undecided_when_too_few_seeds_succeeded():
    control = row(failures=4, best=0.1)  # 1 of 5: no median to compare against
    v = plan_verdict(table(control=control), DEEP_OK)
    assert v.verdict == "undecided"
    assert v.reasons[0] == "the architectural fix's Stage A cannot be judged"
    assert "too few successful runs for a median (need 2): hybrid: 1/5 runs succeeded" in v.reasons[1]
    assert checks(v)["architectural fix: lower failure rate than the control"] is True  # judged without medians
    # with min_successes=1 the same table is decided
    assert plan_verdict(table(control=control), DEEP_OK, min_successes=1).verdict == "gold"
    # the fix fails for sure, but AGC's 10% rule needs the control's median
    v = plan_verdict(table(control=control, arch=row(failures=1, kinds=["non-finite"])))
    assert v.verdict == "undecided" and "AGC's condition cannot be judged" in v.reasons
    every_run_failed = row(failures=5)
    assert plan_verdict(table(agc=every_run_failed, arch=row(best=0.2))).verdict == "pivot"  # 5/5 > 2/5: decided


def test_undecided_when_an_arm_of_the_plan_was_not_run():
    rows = table()
    del rows["hybrid_agc"]
    v = plan_verdict(rows, DEEP_OK)
    assert v.verdict == "undecided" and v.checks == []
    assert v.reasons == ["the plan's decision needs every Stage A arm; missing: AGC (hybrid_agc)"]


def test_the_architectural_fix_and_the_arms_are_arguments():
    rows = table(arch=row(best=0.5), stable_layerscale=row(failures=0, best=0.08))
    assert plan_verdict(rows, DEEP_OK).verdict == "silver"
    v = plan_verdict(rows, DEEP_OK, arch="stable_layerscale")
    assert v.verdict == "gold" and v.winner == "stable_layerscale"


def test_stage_a_winner_is_the_lowest_failure_rate_then_the_lowest_median():
    rows = table(control=row(failures=0, best=0.3), arch=row(failures=1, best=0.01), agc=row(failures=0, best=0.2))
    assert stage_a_winner(rows, ("hybrid", "stable_zero_gamma", "hybrid_agc")) == "hybrid_agc"
    rows["hybrid_agc"] = row(failures=5)  # every run failed: the highest failure rate
    rows["hybrid"] = row(failures=5)
    assert stage_a_winner(rows, ("hybrid", "hybrid_agc", "stable_zero_gamma")) == "stable_zero_gamma"
    assert stage_a_winner(rows, ("stable_layerscale",)) is None
