"""Validation metrics of FusionNet, their baselines, and the seed's staged-validation criteria.

Every metric is a sum over samples, accumulated on the device without host syncs and summed
across ranks once per evaluation (never judged on rank 0's shard alone, the seed's bug).

Position rules (``p_k`` = hypothesis ``k``'s softmax over the legal anchors of the grid):

- ``pos_acc_top{1,5}``: the inference rule. Every pixel is scored ``max_k p_k``, i.e. the top
  candidates of all K heads merged by their highest probability (how ``infer.py`` ranks them);
  a hit when the target anchor is among the ``k`` best pixels.
- ``oracle_acc_top{1,5}``: some hypothesis alone has the target in its top ``k`` (the upper bound
  that winner-takes-all training optimises; the seed's ``oracle_acc_top1``).
- ``hyp{k}_acc_top{1,5}``: hypothesis ``k`` alone.
- ``mean_acc_top{1,5}``: the seed's validation rule, top-k of the mean of the K softmaxes.
- ``act_acc_at_gt``: the action head's argmax at the target pixel; ``act_acc_e2e``: position
  top-1 (inference rule) and action both right.

Against the exact op set of each state (``batch.ops``: what the data allows, not the teacher's draw):

- ``improving_top{1,5}``: some of the model's 1 (5) best proposals lowers the crossings. A
  proposal is an op ``(action, y, x)`` at a legal anchor whose window fits the grid, scored
  ``max_k p_k(y, x) * q(action | y, x)`` (``q`` the action head's softmax at the pixel: how
  ``search.model_ranking`` weighs the ops it samples).
- ``gain_top1``: expected crossing reduction of the top-1 proposal (``-delta`` if it applies,
  negative for an uphill op, 0 if it does not apply).
- ``ceiling_top{1,5}``: the best position top-1 (top-5) any model can reach against the
  teacher's pick, which is uniform over the improving ops: ``E[sum of the k largest per-anchor
  counts / #improving]``; ``ceiling_op_top1 = E[1 / #improving]`` is the ceiling of the op
  (position and action) and ``improving_ops`` the mean ``#improving``. ``pos_top1_of_ceiling`` is
  ``pos_acc_top1 / ceiling_top1``.
- ``baseline_uniform_improving_top1``: a uniformly drawn proposal improves.
- Per zone pattern ``p``: ``{pos_acc_top1, improving_top1, improving_top5, gain_top1,
  ceiling_top1, pos_top1_of_ceiling}_{p}`` and ``n_{p}``.

Baselines, measured on the same validation samples and the same legal-anchor mask:

- ``baseline_uniform_top{1,5}``: expected accuracy of picking 1 (5) legal anchors uniformly.
- ``baseline_freq_top{1,5}``: the legal anchors ranked by how often they were the target in
  the train split at this grid size (a "most frequent position" predictor).
- ``baseline_act_acc``: always the train split's most frequent action.
- ``target_legal``: fraction of targets inside the legal-anchor mask (a ceiling for every rule).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from blockyard.data import GroupedStore
from blockyard.losses import MASK_FILL, LossOutput, topk_accuracy
from blockyard.train import all_reduce_sum

from .batches import Batch, ModelInputs
from .grid import ZONE_PATTERNS
from .model import N_ACTIONS, FusionOutput
from .ops import OPS

__all__ = ["PER_PATTERN", "FrequencyPrior", "ValidationMetrics", "fitting_ops", "frequency_prior",
           "pattern_table", "proposal_scores", "staged_criteria"]

#: metrics also reported per zone pattern (``{name}_{pattern}``)
PER_PATTERN = ("pos_acc_top1", "improving_top1", "improving_top5", "gain_top1", "ceiling_top1")
_OP_WIDTHS = torch.tensor([s.width for s in OPS])
_OP_HEIGHTS = torch.tensor([s.height for s in OPS])


def fitting_ops(mask: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 12, H, W)`` bool: the op ``(action, y, x)`` is a candidate proposal, its anchor legal
    (``mask (B, H, W)``, True = masked) and its window inside the grid (``pad_mask``: padding)."""
    b, height, width = mask.shape
    rows = torch.full((b,), height, device=mask.device) if pad_mask is None else (~pad_mask[:, :, 0]).sum(1)
    cols = torch.full((b,), width, device=mask.device) if pad_mask is None else (~pad_mask[:, 0, :]).sum(1)
    ys = torch.arange(height, device=mask.device)[None, None, :, None]
    xs = torch.arange(width, device=mask.device)[None, None, None, :]
    fit_y = ys <= (rows[:, None] - _OP_HEIGHTS.to(mask.device)[None])[:, :, None, None]
    fit_x = xs <= (cols[:, None] - _OP_WIDTHS.to(mask.device)[None])[:, :, None, None]
    return fit_y & fit_x & ~mask[:, None]


def proposal_scores(out: FusionOutput, mask: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 12 * H * W)`` float32 score of every op, ``max_k p_k(y, x) * q(action | y, x)``, -1 where
    it is no candidate (:func:`fitting_ops`); flat index ``action * H * W + y * W + x``."""
    position = out.position.float().masked_fill(mask[:, None], MASK_FILL).flatten(2).softmax(-1).amax(1)
    action = out.action.float().softmax(1)
    scores = position.view_as(mask)[:, None] * action
    return scores.masked_fill(~fitting_ops(mask, pad_mask), -1.0).flatten(1)


class FrequencyPrior(NamedTuple):
    """Train-split target counts per grid shape ``{(h, w): (h, w) counts}`` and the commonest action."""

    position: dict[tuple[int, int], np.ndarray]
    action: int


def frequency_prior(store: GroupedStore) -> FrequencyPrior:
    """Count the target anchors of a (train) store per grid shape, and its actions."""
    targets = store.column("target").numpy()
    groups = store.group_ids
    maps: dict[tuple[int, int], np.ndarray] = {}
    for g, group in enumerate(store.groups):
        h, w = group.key[-2:]
        sel = targets[groups == g]
        counts = maps.setdefault((h, w), np.zeros((h, w), dtype=np.float64))
        np.add.at(counts, (sel[:, 0], sel[:, 1]), 1.0)
    action = int(np.bincount(targets[:, 2], minlength=N_ACTIONS).argmax()) if len(targets) else 0
    return FrequencyPrior(maps, action)


class ValidationMetrics:
    """Accumulates the metrics above over batches; :meth:`compute` sums across ranks.

    Every rank creates the same keys up front, so the cross-rank sum is one fixed-size vector
    even when a rank saw no batch.
    """

    def __init__(self, hypotheses: int, prior: FrequencyPrior, device: torch.device) -> None:
        self.hypotheses, self.prior, self.device = hypotheses, prior, device
        names = ["n", "loss", "pos", "act", "div", "act_acc_at_gt", "act_acc_e2e", "baseline_act_acc",
                 "target_legal", "legal_anchors"]
        for k in (1, 5):
            names += [f"pos_acc_top{k}", f"oracle_acc_top{k}", f"mean_acc_top{k}", f"baseline_uniform_top{k}",
                      f"baseline_freq_top{k}"] + [f"hyp{h}_acc_top{k}" for h in range(hypotheses)]
        names += ["improving_top1", "improving_top5", "gain_top1", "ceiling_top1", "ceiling_top5", "ceiling_op_top1",
                  "improving_ops", "baseline_uniform_improving_top1"]
        names += [f"n_{p}" for p in ZONE_PATTERNS] + [f"{m}_{p}" for m in PER_PATTERN for p in ZONE_PATTERNS]
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    def _add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] += values.double().sum()

    def _prior(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._priors:
            counts = self.prior.position.get((height, width), np.zeros((height, width)))
            self._priors[(height, width)] = torch.as_tensor(counts, dtype=torch.float32, device=self.device)
        return self._priors[(height, width)]

    @torch.no_grad()
    def update(self, out: FusionOutput, batch: Batch, inputs: ModelInputs, loss: LossOutput) -> None:
        mask, centers = inputs.mask, inputs.centers.long()
        b, k, height, width = out.position.shape
        rows = torch.arange(b, device=mask.device)
        target = centers[:, 0] * width + centers[:, 1]
        legal = ~mask[rows, centers[:, 0], centers[:, 1]]
        n_legal = (~mask).flatten(1).sum(1).clamp_min(1).double()
        n = torch.full((b,), 1.0, device=self.device)
        self._add("n", n)
        self._add("loss", n * loss.total.detach().double())
        for term in ("pos", "act", "div"):
            self._add(term, n * loss.terms[term].double())
        self._add("target_legal", legal)
        self._add("legal_anchors", n_legal)

        prob = out.position.float().masked_fill(mask[:, None], MASK_FILL).flatten(2).softmax(-1)  # (B, K, HW)
        prior = self._prior(height, width).flatten()[None].expand(b, -1).masked_fill(mask.flatten(1), -1.0)
        hits = {}
        for top in (1, 5):
            top_k = min(top, height * width)

            def hit(scores: torch.Tensor, top_k: int = top_k) -> torch.Tensor:
                return topk_accuracy(scores, target, k=top_k, reduction="none").bool() & legal

            hits[top] = hit(prob.amax(1))
            self._add(f"pos_acc_top{top}", hits[top])
            per_hyp = torch.stack([hit(prob[:, h]) for h in range(k)], 1)
            self._add(f"oracle_acc_top{top}", per_hyp.any(1))
            for h in range(k):
                self._add(f"hyp{h}_acc_top{top}", per_hyp[:, h])
            self._add(f"mean_acc_top{top}", hit(prob.mean(1)))
            self._add(f"baseline_freq_top{top}", hit(prior))
            self._add(f"baseline_uniform_top{top}", legal * n_legal.clamp(max=top) / n_legal)

        action_at_gt = out.action.float()[rows, :, centers[:, 0], centers[:, 1]].argmax(-1)
        act_hit = action_at_gt == batch.target[:, 2]
        self._add("act_acc_at_gt", act_hit)
        self._add("act_acc_e2e", act_hit & hits[1])
        self._add("baseline_act_acc", batch.target[:, 2] == self.prior.action)
        per_sample = {"pos_acc_top1": hits[1], **self._against_op_sets(out, batch, inputs)}
        for i, name in enumerate(ZONE_PATTERNS):
            of = batch.pattern == i
            self._add(f"n_{name}", of)
            for metric in PER_PATTERN:
                self._add(f"{metric}_{name}", per_sample[metric] * of)

    def _against_op_sets(self, out: FusionOutput, batch: Batch, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """The op-set metrics (module docstring), summed; returns the per-sample ones for the patterns."""
        improving, delta = inputs.ops.improving, inputs.ops.delta
        scores = proposal_scores(out, inputs.mask, batch.pad_mask)
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices
        flat_improving = improving.flatten(1)
        hit = flat_improving.gather(1, top)
        per = {"improving_top1": hit[:, 0], "improving_top5": hit.any(1),
               "gain_top1": -delta.flatten(1).gather(1, top[:, :1])[:, 0].double()}
        counts = improving.sum(1).flatten(1).double()  # improving ops per anchor
        total = counts.sum(1)
        share = counts / total.clamp_min(1)[:, None]
        per["ceiling_top1"] = share.amax(1)
        self._add("ceiling_top5", share.topk(min(5, share.shape[1]), dim=1).values.sum(1))
        self._add("ceiling_op_top1", (total > 0) / total.clamp_min(1))
        self._add("improving_ops", total)
        candidates = fitting_ops(inputs.mask, batch.pad_mask).flatten(1).sum(1).double()
        self._add("baseline_uniform_improving_top1", total / candidates.clamp_min(1))
        for name, values in per.items():
            self._add(name, values)
        return per

    def compute(self) -> dict[str, float]:
        """Means over every validation sample of every rank (all ranks must call it)."""
        names = list(self.sums)
        total = all_reduce_sum(torch.stack([self.sums[n] for n in names])).cpu().tolist()
        sums = dict(zip(names, total))
        n = max(sums["n"], 1.0)
        out = {"n": int(sums["n"])}
        per_pattern = {f"{m}_{p}" for m in PER_PATTERN for p in ZONE_PATTERNS}
        for name in names:
            if name == "n" or name.startswith("n_") or name in per_pattern:
                continue
            out[name] = sums[name] / n
        out["pos_top1_of_ceiling"] = out["pos_acc_top1"] / max(out["ceiling_top1"], 1e-12)
        for p in ZONE_PATTERNS:
            out[f"n_{p}"] = int(sums[f"n_{p}"])
            if sums[f"n_{p}"] > 0:
                for m in PER_PATTERN:
                    out[f"{m}_{p}"] = sums[f"{m}_{p}"] / sums[f"n_{p}"]
                out[f"pos_top1_of_ceiling_{p}"] = out[f"pos_acc_top1_{p}"] / max(out[f"ceiling_top1_{p}"], 1e-12)
        return out


def pattern_table(record: dict[str, Any]) -> str:
    """The validation metrics against the op sets, overall and per zone pattern, as a text table."""
    head = (f"{'pattern':<12}{'samples':>8}{'improving top-1':>16}{'top-5':>8}{'gain top-1':>11}"
            f"{'pos top-1':>10}{'ceiling':>9}{'of ceiling':>11}")
    lines = [head, "-" * len(head)]
    rows = [(p, f"_{p}", record.get(f"n_{p}", 0)) for p in ZONE_PATTERNS if record.get(f"n_{p}", 0)]
    for name, suffix, n in [*rows, ("all", "", record["n"])]:
        r = {k: record[k + suffix] for k in (*PER_PATTERN, "pos_top1_of_ceiling")}
        lines.append(f"{name:<12}{n:>8}{r['improving_top1']:>16.1%}{r['improving_top5']:>8.1%}"
                     f"{r['gain_top1']:>11.3f}{r['pos_acc_top1']:>10.1%}"
                     f"{r['ceiling_top1']:>9.1%}{r['pos_top1_of_ceiling']:>11.1%}")
    lines.append(f"uniform proposal improves {record['baseline_uniform_improving_top1']:.1%}; "
                 f"{record['improving_ops']:.2f} improving ops per state, op (position + action) ceiling "
                 f"E[1/#improving] {record['ceiling_op_top1']:.1%}, position top-5 ceiling "
                 f"{record['ceiling_top5']:.1%}")
    return "\n".join(lines)


def _check(stage: int, rule: str, measured: str, passed: bool | None) -> dict[str, Any]:
    return {"stage": stage, "rule": rule, "measured": measured,
            "result": "N/A" if passed is None else ("PASS" if passed else "FAIL")}


def staged_criteria(records: list[dict[str, Any]], inference: dict[str, Any] | None,
                    skipped_steps: int = 0) -> list[dict[str, Any]]:
    """The seed's four staged-validation rules, judged on what this run measured.

    ``records`` are the metrics.jsonl epochs. "Trending" and "decreasing" compare the last
    epoch with the first (and, for accuracy, require the last to be the higher). The inference
    rules read ``inference["overall"]``: ``model_mean_reduction`` and ``model_improved_fraction``
    of setting 1 (from mid-trajectory states, where an improving op exists).
    """
    first, last = records[0], records[-1]
    acc = [r["pos_acc_top1"] for r in records]
    losses = [r["loss"] for r in records] + [r["train_loss"] for r in records]
    finite = all(math.isfinite(v) for v in losses) and skipped_steps == 0
    trend = last["pos_acc_top1"] > first["pos_acc_top1"] or len(records) == 1
    out = [_check(1, "val_pos_acc_top1 trending > 20%",
                  f"top-1 {first['pos_acc_top1']:.1%} (epoch {first['epoch']}) -> {last['pos_acc_top1']:.1%} "
                  f"(epoch {last['epoch']}), best {max(acc):.1%}", last["pos_acc_top1"] > 0.20 and trend),
           _check(2, "no NaN, loss decreasing",
                  f"all losses finite: {finite} (skipped steps {skipped_steps}); val loss {first['loss']:.4f} -> "
                  f"{last['loss']:.4f}, train loss {first['train_loss']:.4f} -> {last['train_loss']:.4f}",
                  finite and last["loss"] < first["loss"] and last["train_loss"] < first["train_loss"])]
    overall = (inference or {}).get("overall") if inference else None
    if overall is None:
        out.append(_check(3, "pos_acc > 25%, any inference reductions",
                          f"top-1 {last['pos_acc_top1']:.1%}; inference not run", None))
        out.append(_check(4, "pos_acc > 35%, avg reduction > 5.0, > 50% improved",
                          f"top-1 {last['pos_acc_top1']:.1%}; inference not run", None))
        return out
    red, imp = overall["model_mean_reduction"], overall["model_improved_fraction"]
    out.append(_check(3, "pos_acc > 25%, any inference reductions",
                      f"top-1 {last['pos_acc_top1']:.1%}; mean reduction {red:.2f}, improved {imp:.1%}",
                      last["pos_acc_top1"] > 0.25 and red > 0))
    out.append(_check(4, "pos_acc > 35%, avg reduction > 5.0, > 50% improved",
                      f"top-1 {last['pos_acc_top1']:.1%}; mean reduction {red:.2f}, improved {imp:.1%}",
                      last["pos_acc_top1"] > 0.35 and red > 5.0 and imp > 0.5))
    return out
