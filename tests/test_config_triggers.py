"""A trigger's settings are checked with the config, by the types and ranges its kind's module declares:
``poison=label_consistent poison.trigger.eps=-1`` fails before any data is read or the surrogate model trained."""

from __future__ import annotations

import pytest

from potion.config.compose import check_command_line, compose_config
from potion.core.errors import ConfigError


@pytest.mark.parametrize(("overrides", "needle"), [
    (["poison=label_consistent", "poison.trigger.eps=-1"], r"poison.trigger.eps=-1: must be a finite number > 0"),
    (["poison=label_consistent", "poison.trigger.eps=0"], r"poison.trigger.eps=0"),
    (["poison=label_consistent", "poison.trigger.amplitude=300"], r"poison.trigger.amplitude=300"),
    (["poison=label_consistent", "poison.trigger.pgd_steps=-2"], r"pgd_steps=-2: must be an integer >= 0"),
    (["poison=blend", "poison.trigger.alpha=1.5"], r"poison.trigger.alpha=1.5: must be a finite number > 0 and <= 1"),
    (["poison=sig", "poison.trigger.delta=-3"], r"poison.trigger.delta=-3"),
    (["poison=ftrojan", "poison.trigger.magnitude=0"], r"poison.trigger.magnitude=0"),
])
def test_bad_trigger_amounts_fail_with_the_config(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_command_line("train", ["experiment=quickstart", *overrides])


def test_good_trigger_amounts_pass() -> None:
    for poison in ("badnets", "blend", "sig", "wanet", "ftrojan", "label_consistent", "none"):
        check_command_line("train", ["experiment=quickstart", f"poison={poison}"])
    check_command_line("train", ["experiment=quickstart", "poison=label_consistent", "poison.trigger.eps=16"])


def test_run_training_checks_them_before_reading_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python entry point too: the config check fails before any data is loaded."""
    from potion.pipelines import train

    monkeypatch.setattr(train, "load_data", lambda *a, **k: pytest.fail("data read before the config check"),
                        raising=False)
    cfg = compose_config("train", ["experiment=quickstart", "poison=label_consistent", "poison.trigger.eps=-1",
                                   "logger=none"])
    with pytest.raises(ConfigError, match="poison.trigger.eps"):
        train.run_training(cfg)
