"""PTN's decisive scan: each step measured only as far as its stop/go decision needs, with the same answer.

The in-process search visits every step; :meth:`ForgetCriterion.within` stops measuring a step once the
chunks seen prove it above the threshold, and measures a qualifying step in full. So the chosen step, its
weights and its forget accuracy equal the full scan's, whether or not forget_acc is monotone in the step,
while far fewer samples go through the model.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn

from potion.unlearning.dampening import dampen_, snapshot
from potion.unlearning.ptn import PTNSchedule, Selection, ptn_search
from potion.unlearning.ssd_family import ForgetCriterion, grouped_forget_acc

TRIGGER, D = 10, 40  # trigger features, input features


class Counted(nn.Module):
    """A hand-made poisoned linear model that counts the samples it has seen (what the decisive scan saves).

    Six trigger features push class 0 (the target) against its negative bias; dampening their weights,
    which the forget importances single out, turns triggered samples back to their host class.
    """

    def __init__(self, seed: int, d: int = D, classes: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Linear(d, classes)
        with torch.no_grad():
            self.net.weight.copy_(torch.randn(classes, d, generator=gen) * 0.7)
            self.net.weight[0, :TRIGGER] += 1.0 + torch.rand(TRIGGER, generator=gen)
            self.net.bias.copy_(torch.tensor([-5.0, 0.0, 0.0, 0.0]))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.net(x)



def _groups(sizes: tuple[int, ...], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Triggered samples labelled as the target (a discovered group, synthetic groups)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, D, generator=gen)
        x[:, :TRIGGER] += 1.5
        out.append((x, torch.zeros(n, dtype=torch.long)))
    return out


def _importances(model: nn.Module, seed: int) -> tuple[dict, dict]:
    """The trigger weights far more important to the forget set, in a random order; the rest a little."""
    gen = torch.Generator().manual_seed(seed + 1)
    imp_r = {n: torch.rand(p.shape, generator=gen) + 0.05 for n, p in model.named_parameters()}
    imp_f = {n: torch.rand(p.shape, generator=gen) * 1.2 for n, p in model.named_parameters()}
    imp_f["net.weight"][0, :TRIGGER] = 5 + 20 * torch.rand(TRIGGER, generator=gen)
    return imp_r, imp_f


@pytest.mark.parametrize("sizes", [(1, 300), (40,), (5, 200, 60)])
def test_within_is_the_value_when_it_qualifies_and_nan_only_when_it_cannot(sizes: tuple[int, ...]) -> None:
    model = Counted(0)
    crit = ForgetCriterion.measure_start(model, _groups(sizes, 0), chunk=16)
    rng = random.Random(0)
    for trial in range(30):
        damaged = copy.deepcopy(model)
        with torch.no_grad():
            for p in damaged.parameters():
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(trial)) < rng.random())
        value = crit(damaged)
        for threshold in (value, value - 1e-9, value + 1e-9, rng.random(), 0.0, 1.0):
            got = crit.within(damaged, threshold)
            if value <= threshold:
                assert got == value  # exactly the full measurement
            else:
                assert math.isnan(got)


def test_within_stops_at_the_first_chunk_that_decides() -> None:
    model = Counted(5)
    both = ForgetCriterion.measure_start(model, _groups((1, 512), 5), chunk=64)
    synthetic = ForgetCriterion.measure_start(model, _groups((512,), 6), chunk=64)
    assert both.start[0] == 1 and both.start[1] > 500 and synthetic.start[0] > 500
    for crit, seen in ((both, 1), (synthetic, 64)):  # the discovered sample decides; else one chunk does
        model.seen = 0
        assert math.isnan(crit.within(model, 0.1 * crit(model)))  # the undampened model never qualifies
        assert model.seen == 512 + (1 if crit is both else 0) + seen
    model.seen = 0
    assert both.within(model, 1.0) == both(model)
    assert model.seen == 2 * 513  # a qualifying value is measured in full (twice here: within, then the call)


def test_grouped_value_never_falls_as_hits_are_added() -> None:
    """What makes stopping early exact: a lower bound from the hits counted so far."""
    rng = random.Random(2)
    for _ in range(200):
        start = [rng.randint(0, 20) for _ in range(rng.randint(1, 3))]
        total = max(1, sum(start) + rng.randint(0, 5))
        hits = [rng.randint(0, s) for s in start]
        more = [h + rng.randint(0, 3) for h in hits]
        assert grouped_forget_acc(hits, start, total) <= grouped_forget_acc(more, start, total)


CASES = [(0, 0.1), (1, 0.1), (1, 0.3), (3, 0.1), (7, 0.1), (2, 0.1)]  # reached, non-monotone (7), unreached (2)


@pytest.mark.parametrize(("seed", "rho"), CASES)
def test_decisive_scan_chooses_the_full_scans_step_and_weights(seed: int, rho: float) -> None:
    runs = {}
    for mode in ("full", "decisive"):
        model = Counted(seed)
        crit = ForgetCriterion.measure_start(model, _groups((1, 400), seed), chunk=32)
        imp_r, imp_f = _importances(model, seed)
        originals = snapshot(model)
        schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=40, rho=rho)
        a0 = crit(model)
        model.seen = 0
        decide = crit.within if mode == "decisive" else None
        result = ptn_search(model, originals, imp_r, imp_f, schedule, crit, a0, decide=decide)
        runs[mode] = (result, {n: p.detach().clone() for n, p in model.named_parameters()}, model.seen)
    (full, w_full, seen_full), (fast, w_fast, seen_fast) = runs["full"], runs["decisive"]
    assert fast.reached == full.reached and fast.chosen == full.chosen  # step, alpha, share and forget_acc
    assert all(torch.equal(w_full[n], w_fast[n]) for n in w_full)
    assert [c.step for c in fast.trajectory] == [c.step for c in full.trajectory]
    for a, b in zip(fast.trajectory, full.trajectory, strict=True):
        assert math.isnan(a.forget_acc) or a.forget_acc == b.forget_acc
    assert seen_fast < seen_full / 3, (seen_fast, seen_full)


def test_the_cases_compared_include_non_monotone_and_unreached_searches() -> None:
    """The comparison above is not only over easy trajectories."""
    kinds = set()
    for seed, rho in CASES:
        model = Counted(seed)
        crit = ForgetCriterion.measure_start(model, _groups((1, 400), seed), chunk=32)
        imp_r, imp_f = _importances(model, seed)
        schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=40, rho=rho)
        result = ptn_search(model, snapshot(model), imp_r, imp_f, schedule, crit, crit(model))
        values = [c.forget_acc for c in result.trajectory]
        kinds.add("reached" if result.reached else "unreached")
        if any(b > a for a, b in zip(values, values[1:], strict=False)):
            kinds.add("non-monotone")
    assert kinds == {"reached", "unreached", "non-monotone"}


def test_a_non_monotone_script_stops_at_the_first_qualifying_step() -> None:
    """Any decide() keeping the contract gives the linear answer: here one that qualifies at 3, fails at 4-5."""
    script = [0.9, 0.5, 0.2, 0.1, 0.4, 0.3, 0.0, 0.0]
    model = nn.Linear(3, 2)
    imp = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=len(script), rho=0.1)
    for decisive in (False, True):
        calls: list[str] = []

        def full(_m: nn.Module, calls: list[str] = calls) -> float:
            calls.append("full")
            return script[len(calls) - 1]

        def decide(_m: nn.Module, threshold: float, calls: list[str] = calls) -> float:
            calls.append("decide")
            v = script[len(calls) - 1]
            return v if v <= threshold else math.nan

        result = ptn_search(model, snapshot(model), imp, imp, schedule, full, 1.0,
                            decide=decide if decisive else None)
        assert result.reached and result.chosen.step == 3 and result.chosen.forget_acc == 0.1
        assert calls == ["decide" if decisive else "full"] * 4


def test_an_unreached_decisive_search_measures_its_last_step_in_full() -> None:
    model = Counted(5)
    crit = ForgetCriterion.measure_start(model, _groups((1, 300), 5), chunk=32)
    imp_r, imp_f = _importances(model, 5)
    schedule = PTNSchedule(s_start=1e-4, s_step=1.1, max_steps=5, rho=0.0)
    result = ptn_search(model, snapshot(model), imp_r, imp_f, schedule, crit, crit(model), decide=crit.within)
    assert not result.reached and result.chosen.step == 4
    assert result.chosen.forget_acc == crit(model) > 0  # measured, not NaN: the summary and warning show it
    assert result.summary()["ptn_forget_acc"] == result.chosen.forget_acc


def _scan(seed: int, rho: float, measure: str, reuse: bool) -> tuple:
    model = Counted(seed)
    crit = ForgetCriterion.measure_start(model, _groups((1, 400), seed), chunk=32)
    imp_r, imp_f = _importances(model, seed)
    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=40, rho=rho)
    a0 = crit(model)
    model.seen = 0
    result = ptn_search(model, snapshot(model), imp_r, imp_f, schedule, crit, a0,
                        decide=crit.within if measure == "decisive" else None, reuse_unchanged=reuse)
    return result, {n: p.detach().clone() for n, p in model.named_parameters()}, model.seen


@pytest.mark.parametrize(("seed", "rho"), CASES)
def test_steps_selecting_what_the_last_one_did_are_not_dampened_or_measured_again(seed: int, rho: float) -> None:
    plain, w_plain, seen_plain = _scan(seed, rho, "full", reuse=False)
    reused, w_reused, seen_reused = _scan(seed, rho, "full", reuse=True)
    assert reused.trajectory == plain.trajectory and reused.reached == plain.reached  # every value, every step
    assert all(torch.equal(w_plain[n], w_reused[n]) for n in w_plain)
    assert seen_reused < seen_plain
    both, w_both, seen_both = _scan(seed, rho, "decisive", reuse=True)  # what run_ptn does
    assert both.chosen == plain.chosen and all(torch.equal(w_plain[n], w_both[n]) for n in w_plain)
    assert seen_both <= min(seen_reused, seen_plain / 3)


def test_selection_is_dampens_selection() -> None:
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(30, 7)
    imp_r = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    imp_f = {n: torch.rand(p.shape, generator=gen) * 2 for n, p in model.named_parameters()}
    imp_r["weight"][0, :5] = 0.0  # x/0 and 0/0: selected whenever f > 0, whatever alpha
    imp_f["weight"][0, :2] = 0.0
    imp_f["bias"][3] = float("nan")
    originals = snapshot(model)
    sel = Selection(originals, imp_r, imp_f)
    before = sel.mask(10.0)
    for alpha in (10.0, 3.0, 1.0, 0.7, 0.2, 0.0):
        mask = sel.mask(alpha)
        res = dampen_(copy.deepcopy(model), originals, imp_r, imp_f, alpha)
        assert int(mask.sum()) == res.selected and mask.numel() == res.total
        for name, part in zip(sel.names, mask.split(sel.sizes), strict=True):
            assert torch.equal(part.view(originals[name].shape), imp_f[name] > alpha * imp_r[name])
        changed = sel.changed(mask, before)
        assert changed == [n for n, a, b in zip(sel.names, mask.split(sel.sizes), before.split(sel.sizes),
                                                strict=True) if not torch.equal(a, b)]
        before = mask
