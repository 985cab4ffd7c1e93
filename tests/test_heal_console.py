"""potion.heal's console speaks the README's units, as unlearn.py does: accuracies and rates as fractions,
acc_drop in percentage points (it printed percentages: "discovered still 'airplane' 100.0 % -> 25.0 %")."""

from __future__ import annotations

import re

from potion.pipelines.heal_report import format_result


def test_heal_prints_fractions_and_acc_drop_like_unlearn() -> None:
    s = {"out_dir": "runs/heal/x", "method": "potion", "n_f": 4, "clean_acc_before": 0.9125, "clean_acc_after": 0.9,
         "discovered_given_label_before": 1.0, "discovered_given_label_after": 0.25, "trigger_known": True,
         "asr_before": 0.95, "asr_after": 0.0125, "acc_drop": 1.25, "target_class": "airplane",
         "next_discovered": "runs/heal/x/next_discovered.txt", "next_command": "python -m potion.heal ..."}
    line = format_result(s).splitlines()[1]
    assert "%" not in line
    assert "clean_acc 0.9125 -> 0.9000" in line and "forget_acc 1.0000 -> 0.2500" in line
    assert "asr 0.9500 -> 0.0125" in line and re.search(r"acc_drop=1\.25\b", line)
    unknown = format_result({**s, "trigger_known": False, "acc_drop": None}).splitlines()[1]
    assert "asr" not in unknown and "acc_drop=n/a" in unknown
