"""potion.pipelines.lifecycle: the one run lifecycle of train, unlearn, heal, a sweep's final job (fast, no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from potion.core.interrupt import Interrupted
from potion.pipelines.lifecycle import reuse_finished, run_lifecycle
from potion.tracking.runs import FolderRun
from potion.tracking.tracker import RecordingTracker


class BrokenTracker(RecordingTracker):
    """A tracker whose metric calls fail, as a store that breaks after the run started."""

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        raise RuntimeError("the store broke")


def _run(tmp_path: Path, tracker: RecordingTracker, error: BaseException | None = None) -> None:
    with run_lifecycle(None, tmp_path, run_name="r", tags={"potion.task": "t"}, tracker=tracker) as outputs:
        if error is not None:
            raise error
        outputs.complete({"x": 1}, {"x": 1.0})


@pytest.mark.parametrize(("error", "status"), [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"),
                                               (Interrupted(15), "KILLED"), (KeyboardInterrupt(), "KILLED")])
def test_the_run_ends_with_the_status_of_how_the_work_ended(tmp_path: Path, error: BaseException | None,
                                                           status: str) -> None:
    tracker = RecordingTracker("r1")
    if error is None:
        _run(tmp_path, tracker)
    else:
        with pytest.raises(type(error)):
            _run(tmp_path, tracker, error)
    assert tracker.status == status  # SIGTERM (Interrupted) is KILLED, not FAILED
    assert tracker.calls[0] == ("tags", {"potion.task": "t"})


def test_summary_is_written_last_then_tracked_with_the_trajectory(tmp_path: Path) -> None:
    tracker = RecordingTracker("r1")
    with run_lifecycle(None, tmp_path, run_name="r", tags={}, tracker=tracker) as outputs:
        outputs.trajectory([{"step": 0, "s": 0.1, "forget_acc": 0.9, "dampened_share": 0.0},
                            {"step": 1, "s": 0.2, "forget_acc": 0.1, "dampened_share": 0.1}], 0.5, title="t")
        outputs.complete({"healed": 1.0}, {"healed": 1.0}, tags={"potion.note": "n"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"healed": 1.0}
    assert (tmp_path / "ptn_trajectory.csv").read_text().splitlines()[0] == "step,s,forget_acc,dampened_share"
    metrics = [args for kind, args in tracker.calls if kind == "metrics"]
    assert metrics[0] == ({"healed": 1.0}, None)
    assert metrics[1:] == [({"ptn_traj_s": 0.1, "ptn_traj_forget_acc": 0.9, "ptn_traj_dampened_share": 0.0}, 0),
                           ({"ptn_traj_s": 0.2, "ptn_traj_forget_acc": 0.1, "ptn_traj_dampened_share": 0.1}, 1)]
    artifacts = [Path(args[0]).name for kind, args in tracker.calls if kind == "artifact"]
    assert artifacts == ["ptn_trajectory.csv", "ptn_trajectory.png", "run.log", "summary.json"]  # run.log: its log


def test_a_tracking_failure_after_the_summary_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = BrokenTracker("r1")
    _run(tmp_path, tracker)
    assert tracker.status == "FINISHED" and (tmp_path / "summary.json").is_file()
    assert "tracking the finished run failed" in caplog.text


def test_a_reused_folder_is_logged_into_a_given_tracker(tmp_path: Path) -> None:
    tracker = RecordingTracker("r1")
    spec = FolderRun("unlearn", "potion", "unlearn-x", {"potion.task": "unlearn"}, {"seed": 0}, ("summary.json",))
    (tmp_path / "summary.json").write_text("{}")
    out = reuse_finished(None, tmp_path, {"healed": 1.0}, spec, tracker=tracker)
    assert out == {"healed": 1.0, "reused": True}
    assert ("metrics", ({"healed": 1.0}, None)) in tracker.calls
    assert reuse_finished({"name": "none"}, tmp_path, {"a": 1}, spec) == {"a": 1, "reused": True}
