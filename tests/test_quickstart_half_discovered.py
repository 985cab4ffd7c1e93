"""The issue's finding: potion at 50 % discovered cost the quickstart 7.52 points of clean accuracy (10.58 measured
here on an AMD EPYC), the README's headline 1.39. The quickstart's BadNets poisons images of every class, so some
discovered files are true target-class images; PTN's paper test (``criterion=all``) then dampens the target class
away within the guard's 15 %. The default test leaves them out
(docs/guide.md, *A development measurement: the quickstart by discovered share*)."""

from __future__ import annotations

from pathlib import Path

import pytest

from potion.config.compose import compose_config

pytestmark = pytest.mark.slow  # trains the quickstart model (fewer epochs), heals it twice


def test_half_discovered_costs_the_quickstart_no_class(tmp_path: Path, cache: Path) -> None:
    from potion.pipelines.train import run_training
    from potion.pipelines.unlearn import run_unlearning

    trained = run_training(compose_config("train", ["experiment=quickstart", "train.epochs=8", "logger=none",
                                                    f"out_dir={tmp_path / 'train'}"]))
    assert trained["asr"] > 0.9

    def heal(name: str, *extra: str) -> dict:
        return run_unlearning(compose_config("unlearn", [f"train_run={trained['run_dir']}", "method=potion",
                                                         "discovery.share=0.5", "logger=none", "reference=off",
                                                         f"out_dir={tmp_path / name}", *extra]))

    default = heal("auto")
    assert default["ptn_criterion"] == "exclude_natural_target" and default["forget_natural_target"] >= 1
    assert default["acc_drop"] < 2.0 and default["asr"] < 0.3
    paper = heal("all", "method.ptn.criterion=all")  # the cause, kept reachable: the target class dampened away
    assert paper["acc_drop"] > 5.0 and not paper["ptn_guarded"]
