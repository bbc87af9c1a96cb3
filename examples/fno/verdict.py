"""The FNO stability plan's decision logic, as a pure function of the shootout's table.

The plan names three Stage A arms and one success condition for each fix:

- control: ``hybrid``, no clipping (the negative control);
- architectural fix: ``stable_hybrid`` (norm-last, zero-gamma), no clipping. Success: the lowest
  median validation loss, no NaNs, the lowest failure rate;
- optimization fix: ``hybrid`` with AGC 0.01. Success: a lower failure rate than the control and a
  median validation loss (successful runs only) not worse than the control's by more than 10%.

Stage B runs the Stage A winner with more channel-doubling levels. Success: no NaNs, gradient norm
bounded, and the Stage A validation loss / SSIM matched or beaten. Then the plan decides:

- **gold**: the architectural fix passes Stage A (beats the control on median loss *and* has a lower
  failure rate) and Stage B (scales to depth with a lower failure rate): it becomes the default block;
- **silver**: the architectural fix fails, but AGC lowers the failure rate without a >10% median-loss
  regression: AGC becomes the mandatory training policy;
- **pivot**: both fail: investigate LayerScale.

Readings where the plan leaves room (each reported in the checks):

- "validation loss" is the best validation loss of a run (the plan's tables report "best
  val_loss"); medians are over the successful runs only (the plan's protocol);
- "lowest" compares the three plan arms; a tie in failure rate counts as lowest, but the gold
  standard's "lower failure rate" than the control is strict, so a control that never fails rules
  gold out: there is then no instability for the fix to remove;
- in Stage B, "gradient norm bounded" is a finite largest gradient norm in every run (an unclipped
  explosion ends non-finite); "matches" is within the plan's own 10% tolerance (loss at most 1.1x,
  amplitude SSIM at least 0.9x the winner's Stage A median); "lower failure rate" is against the
  control's Stage A rate; Stage B passes when every depth that ran passes, and cannot be judged
  when none ran (a depth the patch size cannot hold is reported, not run);
- pivot is the plan's "both fail Stage B": Stage B only ever runs the Stage A winner, so here it is
  "neither gold nor silver";
- a median over fewer than ``min_successes`` successful runs is not judged: a decision that needs it
  is **undecided**, with the arm and its count as the reason (so is a decision that needs an arm the
  run did not train, or a Stage B that did not run).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Check", "Verdict", "plan_verdict", "stage_a_winner"]


class Check(NamedTuple):
    """One condition of the plan: ``passed`` is True, False, or None (cannot be judged); ``detail`` says why."""

    name: str
    passed: bool | None
    detail: str


class Verdict(NamedTuple):
    """``verdict``: "gold", "silver", "pivot" or "undecided"; ``reasons``: why, in words; ``checks``: every
    condition evaluated; ``winner``: the Stage A winner (the arm Stage B runs)."""

    verdict: str
    reasons: list[str]
    checks: list[Check]
    winner: str | None


def _all(checks: list[Check]) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is None, else True."""
    values = [c.passed for c in checks]
    return False if False in values else (None if None in values else True)


def _rate(row: Mapping) -> float:
    return row["failures"] / row["n"] if row["n"] else math.nan


def _median(row: Mapping, key: str, min_successes: int) -> float | None:
    value = row[key]["median"]
    ok = row["n"] - row["failures"]
    return value if ok >= min_successes and value is not None and math.isfinite(value) else None


def _ok(row: Mapping) -> str:
    return f"{row['n'] - row['failures']}/{row['n']} runs succeeded"


def stage_a_winner(stage_a: Mapping[str, Mapping], arms: tuple[str, ...]) -> str | None:
    """The plan arm with the lowest failure rate, then the lowest median best validation loss."""
    present = [a for a in arms if a in stage_a and stage_a[a]["n"]]
    if not present:
        return None

    def key(arm: str) -> tuple[float, float]:
        median = _median(stage_a[arm], "best_val", 1)
        return _rate(stage_a[arm]), math.inf if median is None else median

    return min(present, key=key)


def _less(name: str, a: str, row_a: Mapping, b: str, row_b: Mapping, min_successes: int, factor: float = 1.0,
          or_equal: bool = False) -> Check:
    """``median(a) < factor * median(b)`` (``<=`` with ``or_equal``) on the best validation loss."""
    ma, mb = _median(row_a, "best_val", min_successes), _median(row_b, "best_val", min_successes)
    if ma is None or mb is None:
        few = [f"{arm}: {_ok(row)}" for arm, row, m in ((a, row_a, ma), (b, row_b, mb)) if m is None]
        return Check(name, None, f"too few successful runs for a median (need {min_successes}): {'; '.join(few)}")
    passed = ma <= factor * mb if or_equal else ma < factor * mb
    scaled = f" x {factor:g}" if factor != 1 else ""
    return Check(name, passed, f"median best val {a} {ma:.4g} vs {b} {mb:.4g}{scaled}")


def _rate_check(name: str, a: str, row_a: Mapping, b: str, row_b: Mapping, strict: bool) -> Check:
    ra, rb = _rate(row_a), _rate(row_b)
    return Check(name, ra < rb if strict else ra <= rb,
                 f"failures {a} {row_a['failures']}/{row_a['n']} vs {b} {row_b['failures']}/{row_b['n']}")


def _no_nans(name: str, arm: str, row: Mapping) -> Check:
    nans = sum(kind == "non-finite" for kind in row.get("failure_kinds", []))
    return Check(name, nans == 0, f"{arm}: {nans} of {row['n']} runs non-finite")


def _stage_b(stage_b: Mapping[int, Mapping], winner: str, row_a: Mapping, control: Mapping, min_successes: int,
             tolerance: float) -> list[Check]:
    checks = []
    loss_a, ssim_a = _median(row_a, "best_val", min_successes), _median(row_a, "amp_ssim", min_successes)
    for levels, row in sorted(stage_b.items()):
        tag = f"{winner} at {levels} levels"
        checks.append(_no_nans(f"stage B {levels} levels: no NaNs", tag, row))
        worst = row["grad_norm"].get("worst", math.nan)
        checks.append(Check(f"stage B {levels} levels: gradient norm bounded", math.isfinite(worst),
                            f"{tag}: largest gradient norm {worst:.4g}"))
        loss, ssim = _median(row, "best_val", min_successes), _median(row, "amp_ssim", min_successes)
        for what, deep, base, ok in (
                ("val loss", loss, loss_a, lambda d, b: d <= (1 + tolerance) * b),
                ("amp SSIM", ssim, ssim_a, lambda d, b: d >= (1 - tolerance) * b)):
            name = f"stage B {levels} levels: matches or beats Stage A {what}"
            if deep is None or base is None:
                checks.append(Check(name, None, f"too few successful runs for a median (need {min_successes}): "
                                                f"{tag} {_ok(row)}, Stage A {_ok(row_a)}"))
            else:
                checks.append(Check(name, ok(deep, base), f"median {deep:.4g} at depth vs {base:.4g} in Stage A "
                                                          f"(tolerance {tolerance:.0%})"))
        checks.append(_rate_check(f"stage B {levels} levels: lower failure rate than the control",
                                  tag, row, "control (Stage A)", control, strict=True))
    return checks


def plan_verdict(stage_a: Mapping[str, Mapping], stage_b: Mapping[int, Mapping] | None = None, *,
                 stage_b_arm: str | None = None, control: str = "hybrid", arch: str = "stable_zero_gamma",
                 agc: str = "hybrid_agc", min_successes: int = 2, tolerance: float = 0.10) -> Verdict:
    """The plan's verdict from the shootout's per-arm table (see the module docstring).

    Args:
        stage_a: arm -> row, each row with ``n``, ``failures``, ``failure_kinds`` (e.g.
            ``"non-finite"``), and ``best_val`` and ``amp_ssim`` as ``{"median": ...}`` over the
            successful runs (the shape ``fno_shootout.summarize`` writes).
        stage_b: levels -> row of the Stage A winner at that depth (rows as above, plus
            ``grad_norm["worst"]``, the largest gradient norm of any run); ``None`` or empty when
            Stage B did not run.
        stage_b_arm: the arm Stage B ran (default: the Stage A winner).
        control, arch, agc: which arms play the plan's three roles.
        min_successes: successful runs a median needs to be judged.
        tolerance: the plan's 10% (AGC's allowed median-loss regression, Stage B's "matches").

    Returns:
        :class:`Verdict`.
    """
    roles = {"control": control, "architectural fix": arch, "AGC": agc}
    missing = [f"{role} ({arm})" for role, arm in roles.items() if not stage_a.get(arm, {}).get("n")]
    winner = stage_a_winner(stage_a, (control, arch, agc))
    if missing:
        return Verdict("undecided", [f"the plan's decision needs every Stage A arm; missing: {', '.join(missing)}"],
                       [], winner)
    rows = {arm: stage_a[arm] for arm in roles.values()}
    arch_checks = [
        _no_nans("architectural fix: no NaNs", arch, rows[arch]),
        _rate_check("architectural fix: lowest failure rate (vs AGC)", arch, rows[arch], agc, rows[agc], strict=False),
        _rate_check("architectural fix: lower failure rate than the control", arch, rows[arch], control, rows[control],
                    strict=True),
        _less("architectural fix: lowest median loss (vs control)", arch, rows[arch], control, rows[control],
              min_successes),
        _less("architectural fix: lowest median loss (vs AGC)", arch, rows[arch], agc, rows[agc], min_successes),
    ]
    agc_checks = [
        _rate_check("AGC: lower failure rate than the control", agc, rows[agc], control, rows[control], strict=True),
        _less(f"AGC: median loss not worse than the control's by more than {tolerance:.0%}", agc, rows[agc], control,
              rows[control], min_successes, factor=1 + tolerance, or_equal=True),
    ]
    stage_b_arm = stage_b_arm or winner
    b_checks = (_stage_b(stage_b, stage_b_arm, stage_a[stage_b_arm], rows[control], min_successes, tolerance)
                if stage_b and stage_b_arm in stage_a else [])
    checks = arch_checks + agc_checks + b_checks
    arch_a, agc_a = _all(arch_checks), _all(agc_checks)

    if arch_a is False:
        gold, why_gold = False, "the architectural fix fails Stage A"
    elif arch_a is None:
        gold, why_gold = None, "the architectural fix's Stage A cannot be judged"
    elif stage_b_arm != arch:
        gold, why_gold = None, f"the architectural fix passes Stage A, but Stage B ran {stage_b_arm}, not it"
    elif not b_checks:
        gold, why_gold = None, "the architectural fix passes Stage A, but Stage B did not run"
    else:
        gold = _all(b_checks)
        why_gold = {True: "the architectural fix passes Stage A and Stage B",
                    False: "the architectural fix passes Stage A but fails Stage B",
                    None: "the architectural fix passes Stage A; its Stage B cannot be judged"}[gold]
    def unmet(group: list[Check]) -> list[str]:
        """The checks that decide the group: its failures if it fails, else the ones that cannot be judged."""
        decided = _all(group)
        return [f"{c.name}: {c.detail}" for c in group if c.passed is (False if decided is False else None)]

    if gold is True:
        return Verdict("gold", [why_gold], checks, winner)
    reasons = [why_gold, *unmet(arch_checks), *(unmet(b_checks) if arch_a else [])]
    if gold is None:
        return Verdict("undecided", reasons, checks, winner)
    why_agc = {True: f"AGC lowers the failure rate without a >{tolerance:.0%} median-loss regression",
               False: "AGC does not meet its condition", None: "AGC's condition cannot be judged"}[agc_a]
    reasons += [why_agc, *unmet(agc_checks)]
    return Verdict({True: "silver", False: "pivot", None: "undecided"}[agc_a], reasons, checks, winner)
