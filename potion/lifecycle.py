"""One run's lifecycle, the same for train.py, unlearn.py, ``potion.heal`` and a PTN sweep's final job.

Start tracking (or take a tracker started elsewhere: a sweep's final job records its calls for the
sweeper to replay), write the outputs atomically into the run folder, ``summary.json`` last, track them
second (from then on a tracking failure is a warning, never an error: the run is on disk), and end the
MLflow run FINISHED, FAILED, or KILLED when SIGTERM or Ctrl+C stopped it. A finished folder that is
reused instead is logged from the folder when its store lacks it.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potion.io import atomic_write_json, atomic_write_text
from potion.plots import plot_ptn_trajectory
from potion.tracking import Tracker, start_tracker
from potion.tracking_runs import SUMMARY, TRAJECTORY, FolderRun, ensure_logged, log_folder, trajectory_rows

log = logging.getLogger(__name__)


def write_rows_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows of one shape as a CSV file (written atomically); the columns are the first row's keys."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


@dataclass
class RunOutputs:
    """A started run: its folder, its tracker, and the files written so far (tracked as artifacts at the end)."""

    folder: Path
    tracker: Tracker
    artifacts: list[Path] = field(default_factory=list)

    def add(self, path: Path) -> Path:
        """Remember a file written into the folder (atomically, by the caller) as an artifact of the run."""
        self.artifacts.append(Path(path))
        return path

    def trajectory(self, rows: Sequence[Mapping[str, Any]], threshold: float, title: str) -> Path | None:
        """A PTN search's trajectory as ``ptn_trajectory.csv`` and its plot; the plot's path (None: no search)."""
        if not rows:
            return None
        self.add(write_rows_csv(self.folder / TRAJECTORY, rows))
        return self.add(plot_ptn_trajectory(list(rows), threshold, self.folder / "ptn_trajectory.png", title=title))

    def complete(self, summary: dict[str, Any], metrics: Mapping[str, Any],
                 tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (last of the outputs), then track the metrics, the trajectory, tags and files.

        The run is complete once the summary is on disk, so a tracking failure after it is one warning.
        """
        atomic_write_json(self.folder / SUMMARY, summary)
        self.add(self.folder / SUMMARY)
        try:
            self.tracker.log_metrics(metrics)
            for step, row in trajectory_rows(self.folder / TRAJECTORY):
                self.tracker.log_metrics(row, step=step)
            if tags:
                self.tracker.set_tags(tags)
            for path in dict.fromkeys(self.artifacts):
                self.tracker.log_artifact(path)
        except Exception as exc:  # noqa: BLE001 - any tracker failure means the same: results are on disk only
            log.warning("tracking the finished run failed (%s: %s); its results are in %s", type(exc).__name__, exc,
                        self.folder)
        return summary


@contextmanager
def run_lifecycle(logger_cfg: Mapping[str, Any] | None, folder: Path, *, run_name: str, tags: Mapping[str, Any],
                  parent_run_id: str | None = None, tracker: Tracker | None = None) -> Iterator[RunOutputs]:
    """Track one run of work writing into ``folder``: FINISHED when the block ends, FAILED on an error,
    KILLED on SIGTERM or Ctrl+C.

    The run starts as the ``logger`` config says (a dead server or a bad URI fails here, before any work),
    unless ``tracker`` is given (a run started elsewhere): then it gets ``tags`` and its final status.
    """
    if tracker is None:
        tracker = start_tracker(logger_cfg, experiment="potion", run_name=run_name, tags=tags,
                                parent_run_id=parent_run_id)
    else:
        tracker.set_tags(tags)
    with tracker:
        yield RunOutputs(Path(folder), tracker)


def reuse_finished(logger_cfg: Mapping[str, Any] | None, folder: Path, summary: dict[str, Any], spec: FolderRun, *,
                   parent_run_id: str | None = None, tracker: Tracker | None = None) -> dict[str, Any]:
    """A finished run folder used again: its summary marked ``reused``, logged first if its store lacks it.

    With ``tracker`` (a sweep's final job) the folder is logged into it, and the sweeper decides whether the
    store needs it; otherwise the configured store is asked (:func:`potion.tracking_runs.ensure_logged`).
    """
    if tracker is not None:
        log_folder(tracker, folder, summary, spec)
    else:
        summary = ensure_logged(logger_cfg, folder, summary, spec, parent_run_id)
    return {**summary, "reused": True}
