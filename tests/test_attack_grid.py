"""The attack grid's command line: one ``--train-extra`` list moves every attack's trigger."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import attack_grid  # noqa: E402

from potion.config.compose import compose_config  # noqa: E402

MOVES = ["seed=1", "poison.target=3", "poison.trigger.position=top_left", "poison.trigger.warp_seed=2"]


@pytest.mark.parametrize("name, kept", [
    ("badnets", ["seed=1", "poison.target=3", "poison.trigger.position=top_left"]),
    ("wanet", ["seed=1", "poison.target=3", "poison.trigger.warp_seed=2"]),
    ("sig", ["seed=1", "poison.target=3"]),
])
def test_train_extra_keeps_what_the_attack_has(name: str, kept: list[str]) -> None:
    got, left = attack_grid.applicable(name, MOVES)
    assert got == kept
    assert sorted(left) == sorted(set(MOVES) - set(kept))


def test_model_overrides_compose_and_apply(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_config("train", attack_grid.model_overrides("wanet", 10, MOVES))
    assert (cfg.seed, cfg.poison.target, cfg.poison.trigger.warp_seed) == (1, 3, 2)
    assert cfg.poison.trigger.strength == 4.0  # the attack's own overrides stay
    assert "left out poison.trigger.position=top_left" in capsys.readouterr().out


def test_appending_overrides_are_kept() -> None:
    assert attack_grid.applicable("sig", ["+train.note=x"]) == (["+train.note=x"], [])
