"""Result tables and figures of the unlearning grid, read from MLflow.

``python -m potion.report`` (console script ``potion-report``) reads every finished unlearning run
(tag ``potion.task=unlearn``) of the store's experiments (or of one, ``--experiment``) in one paged
``search_runs`` query and counts each measurement once: one row per (training run, method, settings,
seed), so a config run again, or a standalone run and a PTN sweep's final run of the same settings and
seed, count as one seed (the newest). Runs are grouped into studies (data set, model, attack, label
mapping), cells (poison size n_p, discovery share) and method columns, and written into ``--out``:

* ``table.md``: one markdown table per study, cells "healed / acc_drop" (with healed_attainable between
  them where the runs report it) as mean ± std over seeds, a mean row per poison size and an overall
  mean row, the headline aggregate;
* ``table.csv``: the same in long format, one row per (study, n_p, discovery, method), mean rows marked
  ``discovery=mean`` (and ``n_p=all`` for the overall mean);
* ``runs.csv``: the runs the tables count, one per measurement, with their MLflow run ids, code commits and
  processors;
* ``compute.md``: what those runs cost, per processor: each method's runs, hours, mean seconds and passes over
  the data, the trained models' seconds and the total;
* ``models.md``: the finished training runs of those experiments (the models and clean references), with their
  clean accuracy, asr, training time and processor;
* ``healed_vs_discovery``, ``acc_drop_vs_discovery`` (and ``healed_attainable_vs_discovery`` where
  reported) as ``.png`` (300 dpi) and ``.pdf``: a panel per poison size, a line per method with std
  error bars (a suffix naming the study when there are several).

std is the sample standard deviation (ddof=1) over the runs of a cell; non-finite values are left out.
The layers are in :mod:`potion.reporting` (query, aggregate, render, figures); this module is the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from potion.cli import EXIT_USER_ERROR, fast_exit, quiet_third_party
from potion.core.errors import ConfigError, PotionError, TrackingError
from potion.core.io import StorageError, atomic_write_text
from potion.reporting.aggregate import (
    ALL,
    aggregate,
    has_metric,
    safe_name,
    study_of,
    study_suffixes,
    study_title,
    summary_rows,
)
from potion.reporting.compare import comparisons, comparisons_markdown
from potion.reporting.figures import plot_metric
from potion.reporting.query import (
    NoRunsError,
    collect_runs,
    experiment_id,
    experiment_ids,
    measurements,
    model_rows,
    one_line,
    open_store,
    search_rows,
    select,
)
from potion.reporting.render import (
    CSV_COLUMNS,
    compute_markdown,
    csv_text,
    markdown_tables,
    models_markdown,
    runs_csv_text,
)
from potion.reporting.targets import target_rows, targets_markdown
from potion.tracking.tracker import MlflowTracker

__all__ = ["CSV_COLUMNS", "NoRunsError", "aggregate", "build_report", "collect_runs", "main", "markdown_tables",
           "write_report"]

PLOTS = ("healed", "healed_attainable", "acc_drop")
FIGURE_FORMATS = ("png", "pdf")
REPORT_EXPERIMENT = "potion-reports"  # where --log-run puts a report of every experiment


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 methods: Sequence[str] | None = None, models: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    """Write table.md, table.csv, runs.csv, compute.md, models.md (the training runs ``models``, where given) and
    the figures of every study atomically; return the paths."""
    out = Path(out_dir)
    cells = aggregate(rows)
    paths = [atomic_write_text(out / "table.md", markdown_tables(cells, methods)),
             atomic_write_text(out / "table.csv", csv_text(cells)),
             atomic_write_text(out / "runs.csv", runs_csv_text(rows)),
             atomic_write_text(out / "compute.md", compute_markdown(rows, models))]
    if models:
        paths.append(atomic_write_text(out / "models.md", models_markdown(models, rows)))
    if any(r["method"] == "potion" for r in rows):  # potion against each competitor, paired by seed; the targets
        compared = comparisons(rows)
        paths.append(atomic_write_text(out / "comparisons.md", comparisons_markdown(compared)))
        paths.append(atomic_write_text(out / "targets.md", targets_markdown(target_rows(cells, compared))))
    suffixes = study_suffixes(study_of(c) for c in cells)
    for study, suffix in suffixes.items():
        own = [c for c in cells if study_of(c) == study]
        for metric in PLOTS:
            if has_metric(own, metric):
                paths += plot_metric(own, metric, out / f"{metric}_vs_discovery{suffix}", methods,
                                     title=study_title(study), formats=FIGURE_FORMATS)
    return paths


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="potion-report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store: sqlite:///mlflow.db (default: ./mlflow.db) or http://host:port")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (default: every experiment of the store; runs log to one per study)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment>, or reports/all)")
    p.add_argument("--methods", default=None, help="comma-separated methods, in column order (default: all)")
    p.add_argument("--dataset", default=None, help="comma-separated data sets (default: all)")
    p.add_argument("--commit", default=None,
                   help="comma-separated code commits (potion.code_commit, a prefix is enough): only their runs "
                        "(default: all; a study reports its frozen commit)")
    p.add_argument("--log-run", action="store_true", help="log the outputs as artifacts of a potion.task=report run")
    return p


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def read_measurements(client: Any, experiments: Sequence[str], uri: str, filters: Mapping[str, list[str]]
                      ) -> tuple[list[dict], int]:
    """The filtered measurements of the experiments (ids) and how many repeated runs among them were left out."""
    try:
        found = search_rows(client, list(experiments))
    except Exception as exc:
        raise TrackingError(f"cannot search runs in {uri} ({one_line(exc)})") from exc
    return measurements(select(found, filters))


def build_report(args: argparse.Namespace) -> tuple[list[Path], str, int, int]:
    """Read, aggregate and write; (paths written, store URI, runs counted, repeated runs left out)."""
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a folder; give --out a folder (created if missing)")
    client, uri = open_store(args.tracking_uri)
    exp_ids = [experiment_id(client, args.experiment, uri)] if args.experiment else experiment_ids(client, uri)
    filters = {"methods": _split(args.methods), "datasets": _split(args.dataset), "commits": _split(args.commit)}
    rows, left_out = read_measurements(client, exp_ids, uri, filters) if exp_ids else ([], 0)
    if not rows:
        chosen = ", ".join(f"{k}={','.join(v)}" for k, v in filters.items() if v)
        which = f" matching {chosen}" if chosen else ""
        raise NoRunsError(f"no finished unlearning runs{which} in {uri} ({_which(args)}); run unlearn.py first")
    out = Path(args.out) if args.out else Path("reports") / safe_name(args.experiment or "all")
    try:
        paths = write_report(rows, out, filters["methods"] or None, model_rows(client, exp_ids))
    except StorageError as exc:  # its hint names the pipelines' settings; the report's is --out
        hint = str(exc).replace("(out_dir=..., POTION_CACHE_DIR=...)", "(--out <folder>)")
        raise StorageError(exc.errno, hint if "--out" in hint else f"{hint}; give --out another folder") from None
    if args.log_run:
        _log_report_run(uri, args, filters, len(rows), rows, paths)
    return paths, uri, len(rows), left_out


def _runs(n: int, what: str) -> str:
    """``1 unlearning run``, ``2 unlearning runs``."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def _which(args: argparse.Namespace) -> str:
    return f"experiment {args.experiment}" if args.experiment else "all experiments"


def _log_report_run(uri: str, args: argparse.Namespace, filters: Mapping[str, list[str]], n_runs: int,
                    rows: Sequence[Mapping[str, Any]], paths: Sequence[Path]) -> str | None:
    """Log the report files as artifacts of a new run tagged potion.task=report; return its id.

    Its metrics are the headline aggregates, ``<data set>.<model>.<attack>.<method>.<metric>``.
    """
    cells = aggregate(rows)
    tracker = MlflowTracker.start(uri, args.experiment or REPORT_EXPERIMENT, run_name="report",
                                  tags={"potion.task": "report"})
    with tracker:
        tracker.log_params({"filters": {"methods": ",".join(filters["methods"]) or "all",
                                        "datasets": ",".join(filters["datasets"]) or "all",
                                        "commits": ",".join(filters["commits"]) or "all"},
                            "experiment": args.experiment or "all", "n_runs": n_runs, "n_cells": len(cells)})
        headline = {_headline_key(r, name): r[f"{name}_mean"] for r in summary_rows(cells) if r["n_p"] == ALL
                    for name in ("healed", "healed_attainable", "acc_drop")}
        tracker.log_metrics(headline)
        for path in paths:
            tracker.log_artifact(path, "report")
    return tracker.run_id


def _headline_key(row: Mapping[str, Any], metric: str) -> str:
    dataset, model, attack, mapping = study_of(row)
    attack = attack if mapping == "all_to_one" else f"{attack}-{mapping}"
    return f"{dataset}.{model}.{attack}.{row['method']}.{metric}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: write the report; 0 on success, 2 with one ``error:`` line when nothing can be reported."""
    args = _parser().parse_args(argv)
    quiet_third_party()
    fast_exit()
    try:
        paths, uri, n_runs, left_out = build_report(args)
    except PotionError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    repeats = f"; {_runs(left_out, 'repeated run')} of the same settings and seed left out" if left_out else ""
    print(f"report of {_runs(n_runs, 'unlearning run')} from {uri} ({_which(args)}{repeats}):")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
