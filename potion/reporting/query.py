"""MLflow runs -> one flat row per measurement: the store is read in one paged query, repeats left out.

A measurement is one (training run, method, settings, seed). The same measurement can reach a store
more than once: a config rerun with ``force=true``, or a standalone ``unlearn.py`` run and the final run
of a ``sweep.py`` PTN search with the same settings (its config hash differs: the sweeper pins
``method.ptn.fixed_step``). Counting both would report one seed as two, so only the newest counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from potion.core.errors import PotionError, TrackingError
from potion.core.io import one_line
from potion.tracking.client import check_reachable, import_mlflow
from potion.tracking.liveness import CPU_TAG
from potion.tracking.naming import (
    CODE_COMMIT,
    SETTING_DIAGNOSTICS,
    SGD_PARAMS,
    SWEEP_ID,
    TRAIN_CONFIG_HASH,
    TRAIN_RUN_ID,
)
from potion.tracking.uris import resolve_tracking_uri, sqlite_path

PAGE_SIZE = 5000
UNLEARN_FILTER = "tags.`potion.task` = 'unlearn' and attributes.status = 'FINISHED'"
SWEEP_FILTER = "tags.`potion.task` = 'ptn_sweep'"
TRAIN_FILTER = "tags.`potion.task` = 'train' and attributes.status = 'FINISHED'"
# A PTN sweep's whole cost, on its parent run: the wall clock from its prepare job to the end of its final job.
SWEEP_SECONDS = "ptn_wall_seconds"
METRICS = ("healed", "healed_attainable", "acc_drop", "clean_acc", "asr", "unlearn_seconds", "data_passes")
# The params that name a measurement's settings (a key or a dotted prefix), and those the PTN sweeper sets per
# job, never the user (potion.sweep.protocol.SWEEPER_KEYS; a test keeps the two equal).
SETTING_PARAMS = ("method", "discovery", "poison", "dataset", "model", "seed")
SWEEPER_PARAMS = ("method.ptn.fixed_step", "ptn_job")
# Settings a run resolved itself (PTN's threshold, the SGD settings a method fell back to): not the user's, so they
# neither tell measurements apart nor name columns.
RESOLVED_PARAMS = (*SETTING_DIAGNOSTICS.values(), SGD_PARAMS)
# Older runs' param names -> the names of potion.tracking.naming, so old and new runs of one measurement match.
PARAM_ALIASES = {"dataset": "dataset.name", "n_f": "discovery.n_f", "n_p": "poison.n_p"}
NO_VALUE = ("", "None", "null")


class NoRunsError(PotionError):
    """The store holds no finished unlearning run that matches the filters."""


# --------------------------------------------------------------------------- the store


def open_store(tracking_uri: str | None) -> tuple[Any, str]:
    """An MlflowClient for an existing store (never creating one) and its resolved URI."""
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise NoRunsError(f"no MLflow store at {db}; run unlearn.py first or pass --tracking-uri")
    check_reachable(uri)
    mlflow = import_mlflow()
    try:
        return mlflow.MlflowClient(tracking_uri=uri), uri
    except Exception as exc:  # a corrupt database, an unsupported scheme
        raise TrackingError(f"cannot open the MLflow store {uri} ({one_line(exc)})") from exc


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``; NoRunsError naming the experiments there when it does not exist."""
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as exc:
        raise TrackingError(f"cannot read the MLflow store {uri} ({one_line(exc)})") from exc
    if experiment is None or experiment.lifecycle_stage == "deleted":
        try:
            known = sorted(e.name for e in client.search_experiments())
        except Exception:  # noqa: BLE001 - only used to make the message helpful
            known = []
        hint = f" (experiments there: {', '.join(known)})" if known else ""
        raise NoRunsError(f"no MLflow experiment {name!r} in {uri}{hint}; run unlearn.py first or pick --experiment")
    return experiment.experiment_id


def experiment_ids(client: Any, uri: str) -> list[str]:
    """The ids of every active experiment of the store (runs log to one experiment per study)."""
    try:
        return [e.experiment_id for e in client.search_experiments()]
    except Exception as exc:
        raise TrackingError(f"cannot read the MLflow store {uri} ({one_line(exc)})") from exc


# --------------------------------------------------------------------------- runs -> rows


def collect_runs(client: Any, experiment_ids: Sequence[str], filters: Mapping[str, Any] | None = None) -> list[dict]:
    """The measurements of the store: finished unlearning runs as rows (``run_row``), repeats left out.

    ``filters``: optional ``methods`` and ``datasets`` (sequences of names).
    """
    return measurements(select(search_rows(client, experiment_ids), filters))[0]


def select(rows: Iterable[Mapping[str, Any]], filters: Mapping[str, Any] | None) -> list[dict]:
    """The rows of the ``methods``, ``datasets`` and code ``commits`` (a prefix is enough) in ``filters`` (all when a
    filter is empty or missing).

    Before ``measurements``: a run of another code commit must not stand in for a study's cell as its newer repeat.
    """
    filters = filters or {}
    methods = set(filters.get("methods") or ())
    datasets = set(filters.get("datasets") or ())
    commits = tuple(filters.get("commits") or ())
    return [dict(r) for r in rows
            if (not methods or r["method"] in methods) and (not datasets or r["dataset"] in datasets)
            and (not commits or (r.get("commit") or "").startswith(commits))]


def search_rows(client: Any, experiment_ids: Sequence[str]) -> list[dict]:
    """Every finished unlearning run as a row, newest first: one paged ``search_runs``, no per-run calls.

    A PTN sweep's final run costs its whole sweep: its ``unlearn_seconds`` becomes the sweep's wall clock (prepare
    job, candidate rounds and final job; its parent's ``ptn_wall_seconds``, read in one more paged search), and its
    row is marked ``swept``. The final job alone evaluates one fixed step and would read as the cheapest method.
    """
    rows = [row for run in _paged(client, experiment_ids, UNLEARN_FILTER) if (row := run_row(run)) is not None]
    if any(row["sweep_id"] for row in rows):
        costs = {run.info.run_id: run.data.metrics.get(SWEEP_SECONDS)
                 for run in _paged(client, experiment_ids, SWEEP_FILTER)}
        for row in rows:
            whole = costs.get(row["sweep_id"]) if row["sweep_id"] else None
            if whole is not None:
                row.update(unlearn_seconds=float(whole), final_job_seconds=row["unlearn_seconds"], swept=True)
    return rows


def model_rows(client: Any, experiment_ids: Sequence[str]) -> list[dict]:
    """The finished training runs of the experiments (the models the cells heal and the clean references), one row
    each, newest first: attack, seed, poison size, clean_acc, asr, train_seconds, the processor and commit."""
    rows = []
    for run in _paged(client, experiment_ids, TRAIN_FILTER):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        rows.append({"run_id": run.info.run_id, "config_hash": _text(tags.get("potion.config_hash")),
                     "dataset": _first(params, "dataset.name") or "unknown",
                     "model": _first(params, "model.name") or "unknown",
                     "attack": _first(params, "poison.trigger.kind") or "unknown",
                     "mapping": _first(params, "poison.mapping") or "all_to_one",
                     "n_p": _int(_first(params, "poison.n_p")), "seed": _text(params.get("seed")),
                     "cpu": _text(tags.get(CPU_TAG)), "commit": _text(tags.get("mlflow.source.git.commit")),
                     **{name: _float(metrics.get(name)) for name in ("clean_acc", "asr", "train_seconds")}})
    return rows


def _paged(client: Any, experiment_ids: Sequence[str], filter_string: str) -> Iterable[Any]:
    token: str | None = None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=filter_string, max_results=PAGE_SIZE,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def measurements(rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict], int]:
    """Keep the first (newest) row of each measurement; (kept rows, how many were left out).

    Two rows are one measurement when they share a config hash (the same config run again) or a
    training run and settings (``settings_key``: a sweep's final run and a standalone run of the same
    settings and seed). A left-out row's keys count as seen too, so a chain of repeats keeps one row.
    """
    kept: list[dict] = []
    seen: set[tuple] = set()
    left_out = 0
    for row in rows:
        keys = {("settings", row["train_run"], row["settings_key"])}
        if row["config_hash"]:
            keys.add(("config", row["config_hash"]))
        if keys & seen:
            left_out += 1
        else:
            kept.append(dict(row))
        seen |= keys
    return kept, left_out


def run_row(run: Any) -> dict | None:
    """One MLflow run as a flat row, None when it lacks a method, a poison size or a discovery setting.

    Keys: run_id, start_time, config_hash, train_run (the training run's identity), method,
    method_params ((key, value) pairs of its method.* params), dataset, model, attack (trigger kind),
    mapping, n_p, n_f, share (discovered share of the poison), seed, settings_key and ``METRICS``
    (NaN when not logged). Older and newer param names are both read.
    """
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    method = _text(tags.get("potion.method")) or _first(params, "method.name", "method")
    n_p = _int(_first(params, "poison.n_p", "n_p", "poison.count"))
    if not method or not n_p:
        return None
    n_f = _int(_first(params, "discovery.n_f", "n_f"))
    share = _number(params.get("discovery.share"))
    if _int(params.get("discovery.count")) is not None or share is None or n_f == 1:
        share = n_f / n_p if n_f else None  # an explicit count overrides the share (potion.data.discovery)
    if share is None:
        return None
    return {
        "run_id": run.info.run_id,
        "start_time": run.info.start_time or 0,
        "config_hash": _text(tags.get("potion.config_hash")),
        "train_run": train_run_identity(tags, params),
        "method": method,
        "method_params": method_params(params),
        "dataset": _first(params, "dataset.name", "dataset") or "unknown",
        "model": _first(params, "model.name", "model") or "unknown",
        "attack": _first(params, "poison.trigger.kind", "attack") or "unknown",
        "mapping": _first(params, "poison.mapping") or "all_to_one",  # runs from before all_to_all existed
        "n_p": n_p,
        "n_f": n_f,
        "share": float(share),
        "seed": _text(params.get("seed")),
        "settings_key": settings_key(params),
        "sweep_id": _text(tags.get(SWEEP_ID)),  # a PTN sweep's final run: its parent run's id
        "commit": _text(tags.get(CODE_COMMIT)),
        "cpu": _text(tags.get(CPU_TAG)),
        "swept": False,
        **{name: _float(metrics.get(name)) for name in METRICS},
    }


def train_run_identity(tags: Mapping[str, str], params: Mapping[str, str]) -> str:
    """The training run an unlearning run healed: its config hash, else its MLflow run id, else its folder."""
    return (_text(tags.get(TRAIN_CONFIG_HASH)) or _text(tags.get(TRAIN_RUN_ID))
            or _text(tags.get("potion.train_run_dir")) or _text(params.get("train_run")))


def user_settings(params: Mapping[str, str]) -> dict[str, str]:
    """The params under their current names (``PARAM_ALIASES``), without resolved settings or the sweeper's keys;
    of the data set only its name (older runs logged nothing else, and the training run pins the rest)."""
    out = {}
    for key, value in params.items():
        key = PARAM_ALIASES.get(key, key)
        if _under(key, RESOLVED_PARAMS) or _under(key, SWEEPER_PARAMS):
            continue
        if _under(key, ("dataset",)) and key != "dataset.name":
            continue
        out[key] = value
    return out


def settings_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The params that name a measurement's settings (``SETTING_PARAMS``), without the sweeper's own."""
    return tuple(sorted((k, v) for k, v in user_settings(params).items() if _under(k, SETTING_PARAMS)))


def method_params(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The method's own params (``method.`` stripped, its name and the sweeper's keys left out)."""
    return tuple(sorted((k[len("method."):], v) for k, v in user_settings(params).items()
                        if k.startswith("method.") and k != "method.name"))


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _first(params: Mapping[str, str], *keys: str) -> str:
    for key in keys:
        text = _text(params.get(key))
        if text:
            return text
    return ""


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return "" if text in NO_VALUE else text


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):  # missing, "None", "null"
        return None
    return value if math.isfinite(value) else None


def _int(text: Any) -> int | None:
    value = _number(text)
    return int(value) if value is not None else None


def _float(value: Any) -> float:
    return float(value) if value is not None else math.nan
