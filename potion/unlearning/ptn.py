"""PTN (Poison Trigger Neutralisation) search: the smallest assumed poison share s whose dampening
neutralises the forget set (method.md §4).

Candidates s_k = s_start * s_step^k are fixed in advance, so any block of them can be evaluated
independently (see ``hydra_plugins/potion_ptn``); the answer is always the first qualifying k.

The in-process scan visits every step in order, but need not measure each one in full: a ``decide``
measurement (``ptn_search``) stops as soon as the part of the forget set it has seen proves a step
above the threshold. That is exact, not a heuristic: a step that qualifies is always measured in full,
so the scan stops at the same step with the same weights whether or not the criterion is monotone
in k (a galloping or bisecting search would need that assumption and could skip a qualifying step).
Nor need each step be dampened and measured again: a step selecting exactly the parameters of the step
before (common early on, when s_k selects a fraction of one parameter) has the same weights, hence the
same forget accuracy, and only parameters whose selection changed are rewritten (``Selection``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from potion.core.progress import Progress
from potion.unlearning.dampening import RatioPool, dampen_, percentile_for_share
from potion.unlearning.ptn_candidates import Candidate, first_qualifying

__all__ = ["Candidate", "PTNResult", "PTNSchedule", "default_s_start", "evaluate_candidate", "first_qualifying",
           "ptn_search"]

log = logging.getLogger("potion.ptn")


@dataclass(frozen=True)
class PTNSchedule:
    """The candidate grid and stopping threshold (ranges: ``potion.config.schema.PTN``)."""

    s_start: float
    s_step: float
    max_steps: int
    rho: float

    @classmethod
    def from_config(cls, ptn: Mapping[str, Any], n_f: int, num_train: int) -> PTNSchedule:
        """The grid of a ``method.ptn`` block; ``s_start: null`` = :func:`default_s_start`."""
        s_start = ptn["s_start"]
        return cls(s_start=float(s_start) if s_start is not None else default_s_start(n_f, num_train),
                   s_step=float(ptn["s_step"]), max_steps=int(ptn["max_steps"]), rho=float(ptn["rho"]))

    def share(self, k: int) -> float:
        """s_k."""
        return self.s_start * self.s_step ** k

    def percentile(self, k: int) -> float:
        """The percentile used at step k."""
        return percentile_for_share(self.share(k))


def default_s_start(n_f: int, num_train: int, divisor: float = 25.0) -> float:
    """s_start = (n_f / N) / 25 (method.md §4)."""
    return (n_f / num_train) / divisor


@dataclass
class PTNResult:
    """The chosen step (or the last one if rho was never met) and the whole trajectory."""

    a0: float
    threshold: float
    reached: bool
    chosen: Candidate
    trajectory: list[Candidate] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "ptn_a0": self.a0, "ptn_threshold": self.threshold, "ptn_reached": self.reached,
            "ptn_steps": self.chosen.step + 1, "ptn_s": self.chosen.s, "ptn_percentile": self.chosen.percentile,
            "ptn_alpha": self.chosen.alpha, "ptn_dampened_share": self.chosen.dampened_share,
            "ptn_forget_acc": self.chosen.forget_acc,
        }

    def trajectory_rows(self) -> list[dict]:
        return [asdict(c) for c in self.trajectory]


def evaluate_candidate(k: int, schedule: PTNSchedule, pool: RatioPool, model: nn.Module, originals: dict,
                       imp_r: dict, imp_f: dict, forget_acc: Callable[[nn.Module], float], lam: float = 1.0
                       ) -> Candidate:
    """Dampen ``model`` (in place, from ``originals``) at step k and measure the forget accuracy."""
    p = schedule.percentile(k)
    alpha = pool.percentile(p)
    res = dampen_(model, originals, imp_r, imp_f, alpha, lam)
    return Candidate(k, schedule.share(k), p, alpha, res.share, forget_acc(model))


class Selection:
    """Which parameters a dampening at alpha selects (``f > alpha * r``, as :func:`dampen_` tests it), over all
    parameters of ``originals`` as one flat mask: comparing two steps' selections is one operation."""

    def __init__(self, originals: Mapping[str, torch.Tensor], imp_r: Mapping[str, torch.Tensor],
                 imp_f: Mapping[str, torch.Tensor]) -> None:
        self.names = list(originals)
        self.sizes = [imp_r[n].numel() for n in self.names]
        self.r = torch.cat([imp_r[n].flatten() for n in self.names])
        self.f = torch.cat([imp_f[n].flatten() for n in self.names])

    def mask(self, alpha: float) -> torch.Tensor:
        return self.f > alpha * self.r

    def changed(self, mask: torch.Tensor, before: torch.Tensor) -> list[str]:
        """Names of the parameters whose selection differs between two masks."""
        moved = torch.stack([part.any() for part in (mask ^ before).split(self.sizes)]).tolist()
        return [n for n, m in zip(self.names, moved, strict=True) if m]


@dataclass
class _Last:
    """The step the model is dampened at: its selection and its candidate."""

    mask: torch.Tensor
    cand: Candidate


def step_reusing(k: int, schedule: PTNSchedule, pool: RatioPool, model: nn.Module, originals: dict, imp_r: dict,
                 imp_f: dict, measure: Callable[[nn.Module], float], lam: float, selection: Selection,
                 last: _Last | None) -> _Last:
    """:func:`evaluate_candidate` for a scan whose ``measure`` depends on the weights alone.

    The dampened value of a parameter depends on whether it is selected, not on alpha, so a step selecting
    what the model's current step selected has its weights (nothing written, nothing measured: the value
    is the current step's), and otherwise only the parameters whose selection changed are rewritten.
    """
    p = schedule.percentile(k)
    alpha = pool.percentile(p)
    mask = selection.mask(alpha)
    if last is not None and torch.equal(mask, last.mask):
        return _Last(mask, replace(last.cand, step=k, s=schedule.share(k), percentile=p, alpha=alpha))
    names = selection.names if last is None else selection.changed(mask, last.mask)
    dampen_(model, {n: originals[n] for n in names}, imp_r, imp_f, alpha, lam)
    share = int(mask.sum()) / max(1, mask.numel())
    return _Last(mask, Candidate(k, schedule.share(k), p, alpha, share, measure(model)))


def _search_note(cand: Candidate, threshold: float) -> str:
    """The progress line's end: where the search is and how far from stopping."""
    acc = f"> {threshold:.4f}" if math.isnan(cand.forget_acc) else f"{cand.forget_acc:.4f}"  # cut short: above
    return f"step k={cand.step} (s={cand.s:.3g}), forget_acc {acc} (stops at <= {threshold:.4f})"


def ptn_search(model: nn.Module, originals: dict, imp_r: dict, imp_f: dict, schedule: PTNSchedule,
               forget_acc: Callable[[nn.Module], float], a0: float, lam: float = 1.0,
               on_step: Callable[[Candidate], None] | None = None,
               decide: Callable[[nn.Module, float], float] | None = None,
               reuse_unchanged: bool = False) -> PTNResult:
    """Sequential PTN: stop at the first k with forget_acc <= rho * a0; the model is left dampened at it.

    If no step qualifies, the last step's model is kept (as the paper does) and ``reached`` is False.
    ``decide(model, threshold)``: a cheaper measurement for the scan that returns forget_acc exactly when it
    is <= threshold and NaN once what it measured proves it above (never NaN for a qualifying step), so
    the chosen step and weights are those of the full scan; trajectory rows it cut short hold NaN, and an
    unreached search measures its last step in full.
    ``reuse_unchanged``: ``forget_acc`` depends on the weights alone (not on a call count, as scripted test
    stand-ins do), so steps are taken by :func:`step_reusing`: same weights, fewer writes and measurements.
    """
    pool = RatioPool.build(imp_r, imp_f)
    threshold = schedule.rho * a0
    measure = forget_acc if decide is None else (lambda m: decide(m, threshold))
    trajectory: list[Candidate] = []
    bar = Progress("PTN search", schedule.max_steps, bound=True)
    selection = Selection(originals, imp_r, imp_f) if reuse_unchanged else None
    last: _Last | None = None
    for k in range(schedule.max_steps):
        if selection is None:
            cand = evaluate_candidate(k, schedule, pool, model, originals, imp_r, imp_f, measure, lam)
        else:
            last = step_reusing(k, schedule, pool, model, originals, imp_r, imp_f, measure, lam, selection, last)
            cand = last.cand
        trajectory.append(cand)
        if on_step is not None:
            on_step(cand)
        bar.advance(note=lambda c=cand: _search_note(c, threshold))
        if cand.qualifies(threshold):
            bar.finish(f"stopped at step k={k}, forget_acc {cand.forget_acc:.4f}")
            return PTNResult(a0, threshold, True, cand, trajectory)
    bar.finish("the threshold was never met")
    if decide is not None:  # the model is at the last step: its value in full, for the summary and the warning
        trajectory[-1] = replace(trajectory[-1], forget_acc=forget_acc(model))
    log.warning("PTN: rho=%s never met in %d steps (forget_acc %.3f > %.3f); keeping the last step's model",
                schedule.rho, schedule.max_steps, trajectory[-1].forget_acc, threshold)
    return PTNResult(a0, threshold, False, trajectory[-1], trajectory)
