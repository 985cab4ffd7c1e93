"""benchmarks/ptn_groups.py: each PTN criterion group and the guard's loss at chosen steps (why PTN did not stop)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import TinyRun

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ptn_groups  # noqa: E402


@pytest.mark.slow  # the PTN study script on the shared model
def test_it_prints_each_group_falling_with_the_step(tiny: TinyRun, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["ptn_groups.py", str(tiny.run), "--steps", "0,400",
                                      "--override", "discovery.share=0.5"])
    ptn_groups.main()
    out = capsys.readouterr().out
    start = re.search(r"start hits \[(\d+), (\d+)\]", out)  # discovered, synthetic (synthesis runs on 8 samples)
    rows = re.findall(r"k=\s*(\d+) .*hits \{'discovered': (\d+), 'synthetic': (\d+)\}\s+guard loss\s+([\d.]+) %", out)
    assert start and [int(r[0]) for r in rows] == [0, 400]
    (_, d0, s0, g0), (_, d1, s1, g1) = rows
    assert (int(d0), int(s0)) == (int(start.group(1)), int(start.group(2))) and float(g0) == 0.0  # nothing moved
    assert int(d1) < int(d0) and int(s1) < int(s0) and float(g1) > 0.0  # far past the backdoor: everything moves
