"""PTN search (method.md §4): the schedule, the FIRST qualifying step, the unreachable case, the parallel reduction."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn

from potion.config.compose import check_node
from potion.config.schema import PTN
from potion.core.errors import ConfigError
from potion.unlearning.dampening import RatioPool, dampen_, percentile_for_share, snapshot
from potion.unlearning.ptn import (
    Candidate,
    PTNSchedule,
    default_s_start,
    evaluate_candidate,
    first_qualifying,
    ptn_search,
)

PTN_BLOCK = {"rho": 0.1, "s_start": None, "s_step": 1.1, "max_steps": 500, "criterion": "all", "fixed_step": None}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"s_start": 0.0}, "method.ptn.s_start=0.0: must be a finite number > 0 or null"),
        ({"s_start": -1e-3}, "method.ptn.s_start=-0.001: must be a finite number > 0 or null"),
        ({"s_step": 1.0}, "method.ptn.s_step=1.0: must be a finite number > 1"),
        ({"s_step": 0.9}, "method.ptn.s_step=0.9: must be a finite number > 1"),
        ({"rho": -0.01}, "method.ptn.rho=-0.01: must be a finite number >= 0 and <= 1"),
        ({"rho": 1.01}, "method.ptn.rho=1.01: must be a finite number >= 0 and <= 1"),
        ({"max_steps": 0}, "method.ptn.max_steps=0: must be an integer >= 1"),
        ({"max_steps": 2.5}, "method.ptn.max_steps=2.5: must be an integer >= 1"),
        ({"fixed_step": [3, 500]}, "method.ptn.fixed_step=500: must be below method.ptn.max_steps=500"),
        ({"fixed_step": -1}, "method.ptn.fixed_step=-1: must be an integer >= 0 or a list of integers >= 0 or null"),
    ],
)
def test_the_schema_checks_the_schedule(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_node(PTN, {**PTN_BLOCK, **change}, "method.ptn")
    assert str(info.value) == message


def test_schedule_bounds_are_allowed() -> None:
    for change in ({"s_start": 1e-9, "s_step": 1.0001, "max_steps": 1, "rho": 0.0}, {"rho": 1.0},
                   {"fixed_step": [0, 499]}):
        check_node(PTN, {**PTN_BLOCK, **change}, "method.ptn")


def test_schedule_from_the_config_block() -> None:
    sch = PTNSchedule.from_config(PTN_BLOCK, 100, 50_000)
    assert (sch.s_start, sch.s_step, sch.max_steps, sch.rho) == (pytest.approx(8e-5), 1.1, 500, 0.1)
    assert PTNSchedule.from_config({**PTN_BLOCK, "s_start": 0.01}, 100, 50_000).s_start == 0.01


def test_schedule_share_and_percentile() -> None:
    sch = PTNSchedule(s_start=0.002, s_step=1.1, max_steps=500, rho=0.1)
    assert sch.share(0) == pytest.approx(0.002)
    assert sch.share(1) == pytest.approx(0.0022)
    assert sch.share(3) == pytest.approx(0.002 * 1.331)
    assert sch.percentile(3) == pytest.approx(100 - math.log(1 + 100 * 0.002 * 1.331))
    assert default_s_start(100, 50_000) == pytest.approx(8e-5)  # (100 / 50000) / 25


# ----------------------------------------------------------------------------------------------- search


def _setup() -> tuple[nn.Module, dict, dict, dict]:
    torch.manual_seed(0)
    model = nn.Linear(99, 10)  # 1000 parameters
    originals = snapshot(model)
    ratios = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).float() + 1
    imp_r = {"weight": torch.ones(10, 99), "bias": torch.ones(10)}
    imp_f = {"weight": ratios[:990].view(10, 99), "bias": ratios[990:]}
    return model, originals, imp_r, imp_f


def _undampened_share(originals: dict):
    """A deterministic stand-in for forget accuracy: the share of parameters still at their original value."""

    def forget_acc(model: nn.Module) -> float:
        same = sum(int((p == originals[n]).sum()) for n, p in model.named_parameters())
        total = sum(p.numel() for p in model.parameters())
        return same / total

    return forget_acc


def _brute_force(schedule: PTNSchedule, originals: dict, imp_r: dict, imp_f: dict, model: nn.Module, fa, a0: float
                 ) -> int | None:
    pool = RatioPool.build(imp_r, imp_f)
    for k in range(schedule.max_steps):
        fresh = copy.deepcopy(model)
        cand = evaluate_candidate(k, schedule, pool, fresh, originals, imp_r, imp_f, fa)
        if cand.forget_acc <= schedule.rho * a0:
            return k
    return None


@pytest.mark.parametrize("rho", [0.995, 0.97, 0.9])
def test_search_returns_first_qualifying_step(rho: float) -> None:
    model, originals, imp_r, imp_f = _setup()
    fa = _undampened_share(originals)
    a0 = fa(model)
    assert a0 == 1.0
    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=40, rho=rho)
    expected = _brute_force(schedule, originals, imp_r, imp_f, model, fa, a0)
    assert expected is not None and expected > 0  # the case is not trivial

    seen: list[int] = []
    result = ptn_search(model, originals, imp_r, imp_f, schedule, fa, a0, on_step=lambda c: seen.append(c.step))
    assert result.reached
    assert result.chosen.step == expected
    assert len(result.trajectory) == expected + 1
    assert [c.step for c in result.trajectory] == list(range(expected + 1)) == seen
    assert result.threshold == pytest.approx(rho * a0)
    assert result.chosen.forget_acc <= rho * a0
    assert all(c.forget_acc > rho * a0 for c in result.trajectory[:-1])

    # each step follows the schedule and the percentile rule
    pool = RatioPool.build(imp_r, imp_f)
    for c in result.trajectory:
        assert c.s == pytest.approx(schedule.share(c.step))
        assert c.percentile == pytest.approx(percentile_for_share(c.s))
        assert c.alpha == pytest.approx(pool.percentile(c.percentile))
        assert c.dampened_share == pytest.approx(1 - c.forget_acc)  # our stand-in: dampened == changed

    # the model is left dampened at the chosen step
    ref = copy.deepcopy(model)
    dampen_(ref, originals, imp_r, imp_f, result.chosen.alpha)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(model.weight, originals["weight"])

    s = result.summary()
    assert s["ptn_reached"] is True
    assert s["ptn_steps"] == expected + 1
    assert s["ptn_alpha"] == result.chosen.alpha
    assert len(result.trajectory_rows()) == expected + 1


def test_search_scripted_sequence_takes_first_not_best() -> None:
    model, originals, imp_r, imp_f = _setup()
    # not monotone; step 3 equals the threshold exactly (<= qualifies); step 5 is better but later
    script = [0.9, float("nan"), 0.2, 0.1, 0.4, 0.0, 0.0]
    calls = {"n": 0}

    def fa(_model: nn.Module) -> float:
        v = script[calls["n"]]
        calls["n"] += 1
        return v

    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=7, rho=0.1)
    result = ptn_search(model, originals, imp_r, imp_f, schedule, fa, a0=1.0)
    assert result.reached
    assert result.chosen.step == 3
    assert calls["n"] == 4  # stops there: no further candidate is evaluated
    assert len(result.trajectory) == 4


def test_search_unreachable_keeps_last_step() -> None:
    model, originals, imp_r, imp_f = _setup()
    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=6, rho=0.5)
    result = ptn_search(model, originals, imp_r, imp_f, schedule, lambda m: 1.0, a0=1.0)
    assert result.reached is False
    assert result.chosen.step == schedule.max_steps - 1
    assert len(result.trajectory) == schedule.max_steps
    assert result.summary()["ptn_reached"] is False
    assert result.summary()["ptn_steps"] == schedule.max_steps
    ref = copy.deepcopy(model)
    dampen_(ref, originals, imp_r, imp_f, result.trajectory[-1].alpha)
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)


def test_search_rho_zero_needs_zero_forget_acc() -> None:
    model, originals, imp_r, imp_f = _setup()
    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=5, rho=0.0)
    vals = iter([0.01, 0.0, 0.0, 0.0, 0.0])
    result = ptn_search(model, originals, imp_r, imp_f, schedule, lambda m: next(vals), a0=0.8)
    assert result.reached and result.chosen.step == 1


# ------------------------------------------------------------------------------------ parallel reduction


def _cand(step: int, acc: float) -> Candidate:
    return Candidate(step=step, s=0.01 * step, percentile=99.0, alpha=1.0, dampened_share=0.0, forget_acc=acc)


def test_first_qualifying_equals_sequential_answer() -> None:
    rng = random.Random(0)
    for _ in range(20):
        accs = [rng.choice([0.9, 0.5, 0.3, 0.05, 0.0, float("nan")]) for _ in range(25)]
        threshold = 0.1
        sequential = next((k for k, a in enumerate(accs) if a <= threshold), None)  # nan <= x is False
        block = [_cand(k, a) for k, a in enumerate(accs)]
        rng.shuffle(block)
        got = first_qualifying(block, threshold)
        if sequential is None:
            assert got is None
        else:
            assert got is not None and got.step == sequential


def test_first_qualifying_fixed_cases() -> None:
    block = [_cand(7, 0.05), _cand(2, 0.5), _cand(4, 0.1), _cand(9, 0.0), _cand(3, float("nan"))]
    assert first_qualifying(block, 0.1).step == 4
    assert first_qualifying(block, 0.01).step == 9
    assert first_qualifying(block, 0.0).step == 9
    assert first_qualifying([_cand(1, 0.5)], 0.1) is None
    assert first_qualifying([], 0.1) is None
