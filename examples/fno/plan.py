"""What an FNO shootout trains: the arms (with the control's clip sweep) and Stage B's depths."""
from __future__ import annotations

from .arms import ARMS, clip_arm, deepest_levels, resolve_arm

__all__ = ["arm_list", "stage_b_depths"]


def _config(name: str) -> tuple:
    """What a run of the arm depends on: block, clipping rule and threshold, lr factor (not the description)."""
    arm = resolve_arm(name)
    return arm.block, arm.clip, arm.clip_value, arm.lr_scale


def arm_list(arms: str, clip_sweep: str) -> tuple[list[str], dict[float, str]]:
    """The arms to train, and the clip sweep as clip value -> the arm that trains it.

    A sweep value whose configuration an arm of ``arms`` already trains (``hybrid_clip`` for 1) is
    that arm; the others are added as ``hybrid_clip<v>``.
    """
    names = [a for a in arms.split(",") if a]
    for name in names:
        try:
            resolve_arm(name)
        except ValueError:
            raise ValueError(f"--arms: unknown arm {name!r}; choose from {list(ARMS)} or hybrid_clip<v>") from None
    try:
        values = [float(v) for v in clip_sweep.split(",") if v.strip()]
        names_for = {v: clip_arm(v) for v in values}
    except ValueError:
        raise ValueError(f"--clip-sweep: expected comma-separated clip values > 0, got {clip_sweep!r}") from None
    sweep = {}
    for value, name in names_for.items():
        same = [a for a in names if _config(a) == _config(name)]
        sweep[value] = same[0] if same else name
        if not same:
            names.append(name)
    if not names:
        raise ValueError("--arms: expected at least one arm, got none")
    return names, sweep


def stage_b_depths(spec: str, levels: int, patch: int) -> tuple[list[int], dict[int, str]]:
    """Stage B's depths that ``patch`` holds, and the others with the reason (never silently dropped)."""
    deepest = deepest_levels(patch)
    if spec == "none":
        wanted = []
    elif spec == "auto":
        wanted = sorted({deepest, 2 * levels} - set(range(levels + 1)))
    else:
        try:
            wanted = sorted({int(v) for v in spec.split(",") if v.strip()})
        except ValueError:
            wanted = []
        if not wanted or min(wanted) <= levels:
            raise ValueError(f"--stage-b-levels: expected 'auto', 'none' or levels > --levels ({levels}), got {spec!r}")
    infeasible = {d: f"{patch} px patches hold at most {deepest} levels (coarsest level at least 2x2)"
                  for d in wanted if d > deepest}
    return [d for d in wanted if d <= deepest], infeasible
