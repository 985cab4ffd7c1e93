"""PTN's guard (potion.unlearning.ptn_guard): never keep a step that costs more than ``max_acc_loss`` % of what the
model classified right; step back to the last step within it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn as nn
from conftest import TinyRun

from potion.config.compose import check_node, compose_config
from potion.config.schema import PTN
from potion.core.errors import ConfigError
from potion.pipelines.unlearn import run_unlearning
from potion.unlearning.ptn import PTNResult
from potion.unlearning.ptn_candidates import Candidate
from potion.unlearning.ptn_guard import guard_step


class Stepped(nn.Module):
    """A stand-in model whose state is the PTN step it was last dampened at."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step


def _cand(k: int) -> Candidate:
    return Candidate(k, 0.001 * k, 99.0, 1.0, 0.001 * k, 1.0 - 0.01 * k)


def _run(chosen: int, loss_of_step, limit: float) -> tuple[PTNResult, dict, Stepped, list[int]]:
    model, visited = Stepped(chosen), []

    def redo(k: int) -> Candidate:
        visited.append(k)
        model.step = k
        return _cand(k)

    result = PTNResult(a0=1.0, threshold=0.1, reached=True, chosen=_cand(chosen), trajectory=[])
    out, info = guard_step(result, limit, lambda m: loss_of_step(m.step), model, redo)
    return out, info, model, visited


def test_a_step_within_the_guard_is_kept_untouched() -> None:
    out, info, model, visited = _run(40, lambda k: 0.1 * k, limit=5.0)
    assert out.chosen.step == 40 and out.reached and model.step == 40 and visited == []
    assert info == {"ptn_acc_loss": pytest.approx(4.0), "ptn_guarded": 0.0}


@pytest.mark.parametrize("chosen", [7, 8, 40, 499])
def test_the_guard_steps_back_to_the_last_step_within_it(chosen: int) -> None:
    loss = lambda k: 0.5 * k  # noqa: E731  (grows with the step, as dampening does)
    out, info, model, visited = _run(chosen, loss, limit=3.0)
    expect = 6  # 0.5 * 6 = 3.0 is the last step within the limit
    assert out.chosen.step == expect and model.step == expect  # the model is left at the kept step
    assert info["ptn_guarded"] == 1.0 and info["ptn_acc_loss"] == pytest.approx(loss(expect))
    assert info["ptn_guard_from_step"] == chosen
    assert not out.reached  # the kept step does not meet rho (it is below the first qualifying one)
    assert len(visited) <= chosen.bit_length() + 1  # bisection, not a scan


def test_the_first_step_is_always_kept() -> None:
    out, info, model, _ = _run(0, lambda k: 50.0, limit=3.0)
    assert out.chosen.step == 0 and info["ptn_guarded"] == 0.0
    for chosen in (1, 9):
        out, info, model, _ = _run(chosen, lambda k: 50.0, limit=3.0)
        assert out.chosen.step == 0 and model.step == 0 and info["ptn_guarded"] == 1.0


def test_the_schema_checks_the_guard() -> None:
    block = {"rho": 0.1, "s_start": None, "s_step": 1.1, "max_steps": 500, "criterion": "all", "fixed_step": None}
    check_node(PTN, {**block, "max_acc_loss": None}, "method.ptn")
    with pytest.raises(ConfigError, match="method.ptn.max_acc_loss=0"):
        check_node(PTN, {**block, "max_acc_loss": 0}, "method.ptn")


@pytest.mark.slow
def test_potion_keeps_the_model_within_the_guard(tiny: TinyRun, tmp_path: Path) -> None:
    """A step far past what the backdoor needs (``fixed_step``, as a PTN sweep's final run takes one) wrecks the
    tiny model; with the guard the run keeps the last step within it, says so, and loses at most that share."""
    def run(out: str, *extra: str) -> dict:
        return run_unlearning(compose_config("unlearn", [f"train_run={tiny.run}", "logger=none", "method=potion",
                                                         "discovery.share=0.5", "suspects.enabled=false",
                                                         f"out_dir={tmp_path / out}", *extra]))

    wrecked = run("free", "method.ptn.fixed_step=400", "method.ptn.max_acc_loss=null")
    assert "ptn_acc_loss" not in wrecked and wrecked["acc_drop"] > 20, wrecked["acc_drop"]
    kept = run("guarded", "method.ptn.fixed_step=400", "method.ptn.max_acc_loss=5")
    assert kept["ptn_guarded"] == 1.0 and kept["ptn_acc_loss"] <= 5 and kept["ptn_steps"] < 401
    assert kept["acc_drop"] < wrecked["acc_drop"] - 10
    assert "the guard kept step" in kept["ptn_note"]
    search = run("search")  # the default search stops long before: the guard does not bind
    assert search["ptn_guarded"] == 0.0 and search["ptn_acc_loss"] <= 15


@pytest.mark.slow  # a potion_iterative run on the shared model
def test_potion_iterative_does_not_trust_the_suspects_of_a_guarded_round(tiny: TinyRun, tmp_path: Path) -> None:
    """A round whose PTN the guard had to step back may not have healed the model, so samples it flags by how
    that model changed can be damage, not poison: without a trigger signature no further round grows the forget
    set from them (on the digits' all-to-all model three such rounds flagged 986 of 1,437 samples and cost 46
    points of accuracy)."""
    s = run_unlearning(compose_config("unlearn", [
        f"train_run={tiny.run}", "logger=none", "method=potion_iterative", "discovery.share=0.5",
        "method.signature=false",
        "method.ptn.fixed_step=400", "method.ptn.max_acc_loss=5", "method.repair.iterations=0",
        f"out_dir={tmp_path / 'iterative'}", "save_weights=false"]))
    assert s["ptn_guarded"] == 1.0 and s["ptn_acc_loss"] <= 5
    assert s["rounds_run"] == 1 and "round 1: PTN's guard stepped back and no trigger signature" in s["iteration_note"]
    assert s["final_forget_size"] == s["n_f"]
