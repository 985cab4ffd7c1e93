"""The PTN sweeper's search without torch or a real launcher: rounds over a plain launch function.

Any callable that runs a list of jobs and returns their results in order is a launcher to
:func:`potion.sweep.driver.run_sweep`; here the jobs' values are made up (forget_acc falls by 0.1 a step
from a0=0.9, threshold 0.09, so k=9 is the first qualifying step), so the search itself is checked fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from potion.config.compose import compose_config
from potion.core.errors import ConfigError
from potion.sweep.driver import SweepSettings, run_sweep
from potion.sweep.protocol import check_sizes

A0, THRESHOLD = 0.9, 0.09


def _values(job: list[str], final_dir: Path, threshold: float) -> Any:
    role = next(o.split("=", 1)[1] for o in job if o.startswith("++ptn_job.role="))
    if role == "final":
        step = int(next(o.split("=", 1)[1] for o in job if o.startswith("method.ptn.fixed_step=")))
        return {"run_dir": str(final_dir), "mlflow_run_id": None, "clean_acc": 0.8, "healed": 1.0, "step": step}
    steps = [0] if role == "prepare" else [int(k) for k in re.findall(r"\d+", next(
        o for o in job if o.startswith("++ptn_job.steps=")))]
    rows = [{"step": k, "s": 0.01 * 1.5 ** k, "percentile": 0.5, "alpha": 1.0, "dampened_share": 0.01 * k,
             "forget_acc": max(0.0, round(A0 - 0.1 * k, 10)), "a0": A0, "threshold": threshold,
             "importance_cache_hit": float(role != "prepare"), "importance_seconds": 0.0} for k in steps]
    if role == "prepare":
        return {**rows[0], "n_f": 5, "n_p": 20, "prepare_seconds": 0.1}
    return rows


class Launcher:
    """A launcher the sweeper has never heard of: a plain function over job override lists."""

    def __init__(self, final_dir: Path, threshold: float) -> None:
        self.final_dir, self.threshold = final_dir, threshold
        self.launches: list[list[list[str]]] = []

    def __call__(self, jobs: list[list[str]]) -> list[Any]:
        self.launches.append(jobs)
        return [SimpleNamespace(return_value=_values(job, self.final_dir, self.threshold)) for job in jobs]


def _sweep(tmp_path: Path, batch: int, steps_per_job: int | None, threshold: float = THRESHOLD
           ) -> tuple[dict[str, Any], Launcher]:
    cfg = compose_config("unlearn", ["train_run=x", "method=potion", "logger=none", "method.ptn.max_steps=30"])
    launcher = Launcher(tmp_path / "final", threshold)
    settings = SweepSettings(batch, check_sizes(batch, steps_per_job), "Launcher", {"method": "potion"})
    returns = run_sweep(cfg, ["method=potion"], launcher, settings, tmp_path / "sweep")
    assert len(returns) == len(launcher.launches)
    return json.loads((tmp_path / "sweep" / "ptn_sweep.json").read_text()), launcher


def test_the_first_round_holding_a_qualifying_step_ends_the_search(tmp_path: Path) -> None:
    record, launcher = _sweep(tmp_path, batch=4, steps_per_job=3)
    assert record["ptn_chosen_step"] == 9 and record["ptn_reached"] and record["ptn_rounds"] == 3
    assert record["ptn_steps_evaluated"] == 12 and [r["step"] for r in record["trajectory"]] == list(range(12))
    assert [len(jobs) for jobs in launcher.launches] == [1, 2, 2, 2, 1]  # prepare, rounds of 3 + 1 steps, final
    assert all(job[0] == "method=potion" for jobs in launcher.launches for job in jobs)  # the command's overrides
    assert "method.ptn.fixed_step=9" in launcher.launches[-1][0]
    assert record["schedule"]["s_start"] == pytest.approx(0.01) and record["schedule"]["max_steps"] == 30
    assert record["final_run_dir"] == str(tmp_path / "final")
    assert (tmp_path / "sweep" / "ptn_trajectory.csv").read_text().startswith("step,s,percentile")


def test_a_whole_round_is_one_job_unless_told_otherwise(tmp_path: Path) -> None:
    _, launcher = _sweep(tmp_path, batch=4, steps_per_job=None)
    assert [len(jobs) for jobs in launcher.launches] == [1, 1, 1, 1, 1]


def test_without_a_qualifying_step_the_last_one_is_used(tmp_path: Path) -> None:
    record, launcher = _sweep(tmp_path, batch=8, steps_per_job=None, threshold=-1.0)
    assert not record["ptn_reached"] and record["ptn_chosen_step"] == 29 and record["ptn_steps_evaluated"] == 30
    assert len(launcher.launches) == 1 + 4 + 1  # rounds of 8 over 30 steps


@pytest.mark.parametrize(("batch", "per_job"), [(0, None), (True, None), (4, 0), (4, "2"), (None, None)])
def test_bad_sweeper_sizes_are_config_errors(batch: Any, per_job: Any) -> None:
    with pytest.raises(ConfigError, match="hydra.sweeper"):
        check_sizes(batch, per_job)
