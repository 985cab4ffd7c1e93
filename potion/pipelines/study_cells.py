"""A study resumed on a fresh machine: a cell whose finished run of this config and this code is already in the
store is not run again (``skip_logged: true``, which the study configs set).

A session may end half-way through a study's hours of cells, and the next starts without the run folders but with
the store, which travels with the repository. A cell is matched by config hash and code commit
(:func:`current_commit`), so the tables of one code commit never mix code versions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from potion.tracking import naming
from potion.tracking.client import open_client, usable_uri
from potion.tracking.uris import logger_settings

CODE_PATHS = ("potion", "conf", "train.py", "unlearn.py", "sweep.py", "pyproject.toml")  # what computes a cell


def code_commit(checkout: Path) -> str | None:
    """The last commit that changed the code of the git checkout holding ``checkout`` (:data:`CODE_PATHS`); None
    when that code has uncommitted changes, outside a git checkout, or without GitPython.

    Not HEAD: the study commits its store and models as it goes, and those commits change no cell's code."""
    try:
        import git

        repo = git.Repo(checkout, search_parent_directories=True)
        paths = [p for p in CODE_PATHS if (Path(repo.working_tree_dir) / p).exists()]
        if repo.git.status("--porcelain", "--", *paths):  # changed, staged or new files: not any commit's code
            return None
        return next(repo.iter_commits(paths=paths, max_count=1)).hexsha
    except Exception:  # noqa: BLE001  no git, no repository, a detached worktree without objects: no commit
        return None


@functools.cache
def current_commit() -> str | None:
    """The code commit of the checkout this package runs from (:func:`code_commit`), once per process."""
    return code_commit(Path(__file__).resolve().parent)


def logged_cell(logger_cfg: Any, experiment: str, key: str) -> dict[str, Any] | None:
    """The finished unlearning run of config hash ``key`` at this commit in ``experiment``, as a summary.

    The store is the one the cell's run would log to, opened as a run opens it (``logger.fallback`` and
    ``timeout_s`` apply; under the store's lock: a study's parallel first cells may all find a new store)."""
    commit = current_commit()
    settings = logger_settings(logger_cfg)
    if commit is None or settings is None:
        return None
    client, _ = open_client(usable_uri(settings))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    wanted = (f"tags.`{naming.CONFIG_HASH}` = '{key}' and tags.`{naming.CODE_COMMIT}` = '{commit}' and "
              "attributes.status = 'FINISHED'")
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=wanted)
    if not runs:
        return None
    run = runs[0]
    return {**run.data.metrics, "method": run.data.tags.get(naming.METHOD), "config_hash": key,
            "mlflow_run_id": run.info.run_id, "commit": commit, "logged": True}
