"""README's "train the reference yourself" on the quickstart: ``python train.py experiment=quickstart poison=none`` is
accepted (it failed: "set exactly one of poison.count or poison.fraction") and is the quickstart's clean reference run
(same config hash, same run folder), so unlearn.py's ``reference=auto`` finds it."""

from __future__ import annotations

from potion.config.compose import check_command_line, compose_config, identity_hash
from potion.pipelines.reference import canonical_clean, reference_config
from potion.pipelines.train import train_run_dir


def test_poison_none_under_the_quickstart_is_accepted_and_is_its_reference() -> None:
    check_command_line("train", ["experiment=quickstart", "poison=none"])
    own = canonical_clean(compose_config("train", ["experiment=quickstart", "poison=none"]))
    ref = reference_config(compose_config("train", ["experiment=quickstart"]))
    assert identity_hash(own) == identity_hash(ref)
    assert train_run_dir(own) == train_run_dir(ref)
    files = reference_config(compose_config("train", ["experiment=quickstart", "train.trigger_in_files=true"]))
    assert identity_hash(files) == identity_hash(ref)  # with no trigger, where it is written changes nothing


def test_a_poisoned_run_still_needs_exactly_one_size() -> None:
    import pytest

    from potion.core.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of poison.count"):
        check_command_line("train", ["experiment=quickstart", "poison.count=5"])
