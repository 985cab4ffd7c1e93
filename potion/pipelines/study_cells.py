"""A study resumed on a fresh machine: a cell whose finished run of this config and this commit is already in the
store is not run again.

A study (``python unlearn.py -m +study=<name>``, conf/study/) is hours of cells on a shared store that travels
with the repository; a session may end half-way, and the next one starts without the run folders. With
``skip_logged: true`` (the study configs set it) every job first asks the store for a FINISHED unlearning run
with the same config hash (``potion.config_hash``) and the same git commit (``mlflow.source.git.commit``): if
there is one, the job prints it and ends. A changed commit runs the cell again, so the tables of one commit are
never a mix of code versions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from potion.tracking import naming
from potion.tracking.tracker import resolve_tracking_uri

COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag; set from the code's checkout, not from argv[0]


@functools.cache
def current_commit() -> str | None:
    """The commit of the checkout this package runs from (None outside a git checkout, or without GitPython).

    MLflow resolves its git tag from the entry script's folder, which is no checkout for ``python -m`` or a
    test runner; the code that computes a cell is this package, so its checkout is what a cell records."""
    try:
        import git

        return git.Repo(Path(__file__).resolve().parent, search_parent_directories=True).head.commit.hexsha
    except Exception:  # noqa: BLE001  no git, no repository, a detached worktree without objects: no commit
        return None


def logged_cell(logger_cfg: Any, experiment: str, key: str) -> dict[str, Any] | None:
    """The finished unlearning run of config hash ``key`` at this commit in ``experiment``, as a summary."""
    from mlflow.tracking import MlflowClient

    commit = current_commit()
    if commit is None or logger_cfg is None or str(logger_cfg.get("name", "mlflow")) != "mlflow":
        return None
    client = MlflowClient(resolve_tracking_uri(logger_cfg.get("tracking_uri")))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{naming.CONFIG_HASH}` = '{key}' and "
                                            f"tags.`{COMMIT_TAG}` = '{commit}' and attributes.status = 'FINISHED'")
    if not runs:
        return None
    run = runs[0]
    return {**run.data.metrics, "method": run.data.tags.get(naming.METHOD), "config_hash": key,
            "mlflow_run_id": run.info.run_id, "commit": commit, "logged": True}
