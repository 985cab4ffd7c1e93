"""Result tables and plots of the unlearning grid, read from MLflow.

``python -m potion.report`` (console script ``potion-report``) reads every finished unlearning run
(tag ``potion.task=unlearn``) of an experiment in one paged ``search_runs`` query, groups the runs
into cells (data set, poison size n_p, discovery share) x method, and writes into ``--out``:

* ``table.md``: one markdown table per data set, cells "healed / acc_drop" as mean ± std over seeds,
  a mean row per poison size and an overall mean row: the mean over every cell of the data set's grid,
  the paper's headline aggregate (method.md §3);
* ``table.csv``: the same in long format, one row per (data set, n_p, discovery, method), mean rows
  marked ``discovery=mean`` (and ``n_p=all`` for the overall mean);
* ``healed_vs_discovery.png`` and ``acc_drop_vs_discovery.png``: one panel per poison size, one line
  per method with std error bars (a ``_<dataset>`` suffix when several data sets are reported).

Runs with the same ``potion.config_hash`` are one experiment repeated: only the latest counts.
std is the sample standard deviation (ddof=1) over the runs of a cell; non-finite values are left out.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from potion.cli import EXIT_USER_ERROR, fast_exit, quiet_third_party
from potion.errors import PotionError, TrackingError

PAGE_SIZE = 5000
UNLEARN_FILTER = "tags.`potion.task` = 'unlearn' and attributes.status = 'FINISHED'"
SINGLE = "1 sample"
MEAN = "mean"
ALL = "all"
CELL_METRICS = ("healed", "acc_drop", "clean_acc", "asr", "unlearn_seconds")
CSV_COLUMNS = ("dataset", "n_p", "discovery", "method", "n_runs", "healed_mean", "healed_std", "acc_drop_mean",
               "acc_drop_std", "clean_acc_mean", "asr_mean", "unlearn_seconds_mean")
PLOTS = (("healed", "healed (%)"), ("acc_drop", "accuracy drop (pp)"))


class NoRunsError(PotionError):
    """The store holds no finished unlearning run that matches the filters."""


# --------------------------------------------------------------------------- reading runs


def collect_runs(client: Any, experiment_ids: Sequence[str], filters: Mapping[str, Any] | None = None) -> list[dict]:
    """Finished unlearning runs as flat rows, one paged ``search_runs`` query, no per-run calls.

    ``filters``: optional ``methods`` and ``datasets`` (sequences of names). Each row holds run_id,
    start_time, config_hash, method, dataset, n_p, n_f, share (discovered share of the poison), seed and
    the metrics of ``CELL_METRICS`` (NaN when not logged). Runs repeating a config hash count once:
    the latest is kept. Runs without a method or poison size are skipped.
    """
    filters = filters or {}
    methods = set(filters.get("methods") or ())
    datasets = set(filters.get("datasets") or ())
    rows: list[dict] = []
    seen: set[str] = set()
    token: str | None = None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=UNLEARN_FILTER, max_results=PAGE_SIZE,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        for run in page:
            row = run_row(run)
            if row is None:
                continue
            key = row["config_hash"] or row["run_id"]
            if key in seen:  # newest first: a repeated config keeps its latest run
                continue
            seen.add(key)
            if (methods and row["method"] not in methods) or (datasets and row["dataset"] not in datasets):
                continue
            rows.append(row)
        token = page.token
        if not token:
            break
    return rows


def run_row(run: Any) -> dict | None:
    """One MLflow run as a flat dict (see ``collect_runs``), None when it lacks a method or n_p."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    method = tags.get("potion.method") or params.get("method.name")
    n_p = _int(params.get("n_p")) or _int(params.get("poison.count"))
    if not method or not n_p:
        return None
    n_f = _int(params.get("n_f"))
    share = _number(params.get("discovery.share"))
    if _int(params.get("discovery.count")) is not None or share is None or n_f == 1:
        share = n_f / n_p if n_f else None  # an explicit count overrides the share (potion.discovery)
    if share is None:
        return None
    return {
        "run_id": run.info.run_id,
        "start_time": run.info.start_time or 0,
        "config_hash": tags.get("potion.config_hash", ""),
        "method": str(method),
        "dataset": params.get("dataset") or "unknown",
        "n_p": n_p,
        "n_f": n_f,
        "share": float(share),
        "seed": params.get("seed"),
        **{name: _float(metrics.get(name)) for name in CELL_METRICS},
    }


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


# --------------------------------------------------------------------------- aggregation


def discovery_label(n_f: int | None, share: float) -> str:
    """How a discovery setting is shown: "1 sample" for n_f == 1, else the share as a percentage."""
    if n_f == 1:
        return SINGLE
    return f"{round(100 * share, 4):g}%"


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Group runs into cells (dataset, n_p, discovery) x method: means and stds over the runs of a cell.

    Cells come sorted by dataset, n_p, discovery share and method. Each holds the ``CSV_COLUMNS`` plus
    ``share`` (for plotting; 1 sample is at 1/n_p). std is None for a single run.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        n_f = row.get("n_f")
        share = 1 / row["n_p"] if n_f == 1 else row["share"]
        groups[(row["dataset"], row["n_p"], round(share, 9), discovery_label(n_f, share), row["method"])].append(row)
    cells = []
    for (dataset, n_p, share, label, method), members in sorted(groups.items(), key=lambda kv: kv[0]):
        cell: dict[str, Any] = {"dataset": dataset, "n_p": n_p, "discovery": label, "share": share, "method": method,
                                "n_runs": len(members)}
        for name in CELL_METRICS:
            mean, std = _mean_std([m.get(name, math.nan) for m in members])
            cell[f"{name}_mean"] = mean
            if name in ("healed", "acc_drop"):
                cell[f"{name}_std"] = std
        cells.append(cell)
    return cells


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def summary_rows(cells: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Mean rows: per (dataset, n_p) block and per dataset overall, the mean over cells of each method.

    Block rows have ``discovery="mean"``; overall rows also ``n_p="all"``. ``n_cells`` says over how
    many cells the mean was taken and ``n_runs`` how many runs those cells hold; stds are None.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for cell in cells:
        groups[(cell["dataset"], cell["n_p"], cell["method"])].append(cell)
        groups[(cell["dataset"], ALL, cell["method"])].append(cell)
    out = []
    for (dataset, n_p, method), members in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "n_p": n_p, "discovery": MEAN, "share": None, "method": method,
                               "n_runs": sum(m["n_runs"] for m in members), "n_cells": len(members)}
        for name in CELL_METRICS:
            row[f"{name}_mean"] = _mean_std([_nan(m.get(f"{name}_mean")) for m in members])[0]
        row["healed_std"] = row["acc_drop_std"] = None
        out.append(row)
    return sorted(out, key=lambda r: (r["dataset"], r["n_p"] == ALL, r["n_p"] if r["n_p"] != ALL else 0, r["method"]))


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _methods(cells: Sequence[Mapping[str, Any]], order: Sequence[str] | None = None) -> list[str]:
    present = {c["method"] for c in cells}
    first = [m for m in (order or ()) if m in present]
    return first + sorted(present - set(first))


# --------------------------------------------------------------------------- markdown and csv


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_tables(cells: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None) -> str:
    """One markdown table per data set: rows (n_p, discovery), columns methods, cells "healed / acc_drop".

    Each n_p block ends with a mean row and the table with the overall mean row (the headline aggregate).
    When cells hold different numbers of runs each cell shows its n; a mean taken over fewer cells than
    the grid has shows "(k/N cells)".
    """
    means = summary_rows(cells)
    parts = ["# Unlearning results", "",
             "Cells: healed (%) / acc_drop (percentage points), mean ± std (sample std) over seeds. "
             "Mean rows: mean over the cells of each method; the overall mean is the headline aggregate "
             "(method.md §3).", ""]
    for dataset in sorted({c["dataset"] for c in cells}):
        own = [c for c in cells if c["dataset"] == dataset]
        cols = _methods(own, methods)
        show_n = len({c["n_runs"] for c in own}) > 1
        by_key = {(c["n_p"], c["share"], c["method"]): c for c in own}
        grid = sorted({(c["n_p"], c["share"], c["discovery"]) for c in own})
        parts += [f"## {dataset}", "", "| n_p | discovery | " + " | ".join(cols) + " |",
                  "|---:|---|" + "---|" * len(cols)]
        for n_p in sorted({g[0] for g in grid}):
            block = [g for g in grid if g[0] == n_p]
            for _, share, label in block:
                texts = [_cell_text(by_key.get((n_p, share, m)), show_n) for m in cols]
                parts.append(f"| {n_p} | {label} | " + " | ".join(texts) + " |")
            parts.append(_mean_line(str(n_p), means, dataset, n_p, cols, len(block)))
        parts.append(_mean_line(ALL, means, dataset, ALL, cols, len(grid)))
        parts.append("")
    return "\n".join(parts)


def _cell_text(cell: Mapping[str, Any] | None, show_n: bool) -> str:
    if cell is None:
        return "–"
    text = f"{_fmt(cell['healed_mean'], cell['healed_std'])} / {_fmt(cell['acc_drop_mean'], cell['acc_drop_std'])}"
    return f"{text} (n={cell['n_runs']})" if show_n else text


def _mean_line(first: str, means: Sequence[Mapping[str, Any]], dataset: str, n_p: Any, cols: Sequence[str],
               n_grid: int) -> str:
    rows = {r["method"]: r for r in means if r["dataset"] == dataset and r["n_p"] == n_p}
    texts = []
    for method in cols:
        row = rows.get(method)
        if row is None:
            texts.append("–")
            continue
        text = f"{_fmt(row['healed_mean'], None)} / {_fmt(row['acc_drop_mean'], None)}"
        texts.append(text if row["n_cells"] == n_grid else f"{text} ({row['n_cells']}/{n_grid} cells)")
    return f"| {first} | {MEAN} | " + " | ".join(texts) + " |"


def csv_text(cells: Sequence[Mapping[str, Any]]) -> str:
    """The cells and mean rows in long format (``CSV_COLUMNS``); empty fields for missing values."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in [*cells, *summary_rows(cells)]:
        writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return round(value, 6) if isinstance(value, float) else value


# --------------------------------------------------------------------------- plots


def plot_metric(cells: Sequence[Mapping[str, Any]], metric: str, ylabel: str, path: str | Path,
                methods: Sequence[str] | None = None, title: str = "") -> Path:
    """``metric`` against the discovery share: one panel per n_p, one line per method with std error bars."""
    from potion.plots import _pyplot, save_figure

    plt = _pyplot()
    sizes = sorted({c["n_p"] for c in cells})
    cols = _methods(cells, methods)
    colors = {m: f"C{i % 10}" for i, m in enumerate(cols)}  # a method keeps its colour in every panel
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.8 * len(sizes) + 0.6, 3.4), sharey=True, squeeze=False)
    for ax, n_p in zip(axes[0], sizes, strict=True):
        own = [c for c in cells if c["n_p"] == n_p and c.get(f"{metric}_mean") is not None]
        for method in cols:
            points = sorted((c["share"], c[f"{metric}_mean"], c.get(f"{metric}_std") or 0.0)
                            for c in own if c["method"] == method)
            if points:
                xs, ys, es = zip(*points, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", markersize=4, capsize=3, linewidth=1.2, label=method,
                            color=colors[method])
        ticks = sorted({(c["share"], c["discovery"]) for c in own})
        ax.set_xscale("log")
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=7, rotation=30)
        ax.minorticks_off()
        ax.set_title(f"n_p = {n_p}", fontsize=9)
        ax.set_xlabel("discovered share of the poison")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- outputs


def write_report(cells: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 methods: Sequence[str] | None = None) -> list[Path]:
    """Write table.md, table.csv and the two plots (per data set) atomically; return the paths written."""
    from potion.io import atomic_write_text

    out = Path(out_dir)
    paths = [atomic_write_text(out / "table.md", markdown_tables(cells, methods)),
             atomic_write_text(out / "table.csv", csv_text(cells))]
    datasets = sorted({c["dataset"] for c in cells})
    for dataset in datasets:
        own = [c for c in cells if c["dataset"] == dataset]
        suffix = f"_{_safe_name(dataset)}" if len(datasets) > 1 else ""
        for metric, ylabel in PLOTS:
            paths.append(plot_metric(own, metric, ylabel, out / f"{metric}_vs_discovery{suffix}.png", methods,
                                     title=dataset))
    return paths


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]", "_", text).strip(".") or "dataset"


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="potion-report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store: sqlite:///mlflow.db (default: ./mlflow.db) or http://host:port")
    p.add_argument("--experiment", default="potion", help="MLflow experiment name (default: potion)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment>)")
    p.add_argument("--methods", default=None, help="comma-separated methods, in column order (default: all)")
    p.add_argument("--dataset", default=None, help="comma-separated data sets (default: all)")
    p.add_argument("--log-run", action="store_true", help="log the outputs as artifacts of a potion.task=report run")
    return p


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def open_store(tracking_uri: str | None) -> tuple[Any, str]:
    """An MlflowClient for an existing store (never creating one) and its resolved URI."""
    from potion.tracking import _import_mlflow, check_reachable, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise NoRunsError(f"no MLflow store at {db}; run unlearn.py first or pass --tracking-uri")
    check_reachable(uri)
    mlflow = _import_mlflow()
    try:
        return mlflow.MlflowClient(tracking_uri=uri), uri
    except Exception as exc:  # a corrupt database, an unsupported scheme
        raise TrackingError(f"cannot open the MLflow store {uri} ({_one_line(exc)})") from exc


def _experiment_id(client: Any, name: str, uri: str) -> str:
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as exc:
        raise TrackingError(f"cannot read the MLflow store {uri} ({_one_line(exc)})") from exc
    if experiment is None or experiment.lifecycle_stage == "deleted":
        try:
            known = sorted(e.name for e in client.search_experiments())
        except Exception:  # noqa: BLE001 - only used to make the message helpful
            known = []
        hint = f" (experiments there: {', '.join(known)})" if known else ""
        raise NoRunsError(f"no MLflow experiment {name!r} in {uri}{hint}; run unlearn.py first or pick --experiment")
    return experiment.experiment_id


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def build_report(args: argparse.Namespace) -> tuple[list[Path], str, int]:
    """Read, aggregate and write; return the paths written, the store URI and the number of runs used."""
    client, uri = open_store(args.tracking_uri)
    experiment_id = _experiment_id(client, args.experiment, uri)
    filters = {"methods": _split(args.methods), "datasets": _split(args.dataset)}
    try:
        rows = collect_runs(client, [experiment_id], filters)
    except Exception as exc:
        raise TrackingError(f"cannot search runs in {uri} ({_one_line(exc)})") from exc
    if not rows:
        chosen = ", ".join(f"{k}={','.join(v)}" for k, v in filters.items() if v)
        which = f" matching {chosen}" if chosen else ""
        raise NoRunsError(f"no finished unlearning runs{which} in {uri} (experiment {args.experiment}); "
                          "run unlearn.py first")
    cells = aggregate(rows)
    out = Path(args.out) if args.out else Path("reports") / _safe_name(args.experiment)
    paths = write_report(cells, out, filters["methods"] or None)
    if args.log_run:
        _log_report_run(uri, args, filters, len(rows), cells, paths)
    return paths, uri, len(rows)


def _log_report_run(uri: str, args: argparse.Namespace, filters: Mapping[str, list[str]], n_runs: int,
                    cells: Sequence[Mapping[str, Any]], paths: Sequence[Path]) -> str | None:
    """Log the report files as artifacts of a new run tagged potion.task=report; return its id."""
    from potion.tracking import MlflowTracker

    tracker = MlflowTracker.start(uri, args.experiment, run_name="report", tags={"potion.task": "report"})
    with tracker:
        tracker.log_params({"filters": {"methods": ",".join(filters["methods"]) or "all",
                                        "datasets": ",".join(filters["datasets"]) or "all"},
                            "experiment": args.experiment, "n_runs": n_runs, "n_cells": len(cells)})
        headline = {f"{r['dataset']}.{r['method']}.{name}": r[f"{name}_mean"]
                    for r in summary_rows(cells) if r["n_p"] == ALL for name in ("healed", "acc_drop")}
        tracker.log_metrics(headline)
        for path in paths:
            tracker.log_artifact(path, "report")
    return tracker.run_id


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: write the report; 0 on success, 2 with one ``error:`` line when nothing can be reported."""
    args = _parser().parse_args(argv)
    quiet_third_party()
    fast_exit()
    try:
        paths, uri, n_runs = build_report(args)
    except PotionError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(f"report of {n_runs} unlearning runs from {uri} (experiment {args.experiment}):")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
