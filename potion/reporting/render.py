"""Cells -> ``table.md`` (one table per study) and ``table.csv``; runs -> ``runs.csv`` and ``compute.md``."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from potion.reporting.aggregate import (
    ALL,
    MEAN,
    attack_label,
    columns,
    discovery_of,
    has_metric,
    mean_std,
    study_of,
    study_title,
    summary_rows,
    with_columns,
)

CSV_COLUMNS = ("dataset", "model", "attack", "mapping", "n_p", "discovery", "method", "n_runs", "healed_mean",
               "healed_std", "healed_attainable_mean", "healed_attainable_std", "acc_drop_mean", "acc_drop_std",
               "clean_acc_mean", "asr_mean", "asr_std", "unlearn_seconds_mean", "data_passes_mean")
RUN_COLUMNS = ("run_id", "commit", "train_run", "method", "config_hash", "seed", "dataset", "model", "attack",
               "mapping", "n_p", "n_f", "discovery", "healed", "healed_attainable", "acc_drop", "clean_acc", "asr",
               "unlearn_seconds", "data_passes", "swept", "final_job_seconds", "cpu")
NOTE = (
    "healed (%): the share of the accuracy that the trigger took away on triggered test images and that unlearning "
    "gave back (100: as accurate as on clean images). healed_attainable (%): the same, measured against a clean model "
    "of the same recipe trained without poison, which image-wide triggers also fool (docs/guide.md, *Clean reference "
    "and healed_attainable*); n/a where a run had no clean reference model. acc_drop: clean test accuracy lost, in "
    "percentage points. Cells hold the mean ± sample standard deviation over seeds (n: the runs, one per seed, "
    "a cell holds); a run repeating the settings and seed of a newer one (a rerun, or a standalone run and a "
    "sweep's final run) is left out. Mean rows: the mean over the cells of each method; the last row (all) is the "
    "headline aggregate of the study. unlearn_seconds (table.csv, runs.csv): the wall clock of the unlearning step; "
    "for a run a PTN sweep (sweep.py) made, the whole sweep's wall clock from its prepare job to the end of its "
    "final job (every candidate round included; runs.csv: swept=True, final_job_seconds the final job alone)."
)


def markdown_tables(cells: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None) -> str:
    """One markdown table per study: rows (n_p, discovery), method columns, cells "healed / acc_drop".

    A study whose runs report healed_attainable shows it between the two. Each n_p block ends with a
    mean row and the table with the overall mean row. When cells hold different numbers of runs each
    cell shows its n; a mean taken over fewer cells than the grid has shows "(k/N cells)".
    """
    means = summary_rows(cells)
    parts = ["# Unlearning results", "", NOTE, ""]
    for study in sorted({study_of(c) for c in cells}):
        own = [c for c in cells if study_of(c) == study]
        parts += _study_table(study, own, [m for m in means if study_of(m) == study], methods)
    return "\n".join(parts)


def _study_table(study: tuple[str, ...], cells: Sequence[Mapping[str, Any]], means: Sequence[Mapping[str, Any]],
                 methods: Sequence[str] | None) -> list[str]:
    cols = columns(cells, methods)
    metrics = ("healed", "healed_attainable", "acc_drop") if has_metric(cells, "healed_attainable") else (
        "healed", "acc_drop")
    counts = sorted({c["n_runs"] for c in cells})
    show_n = len(counts) > 1
    n_text = "each cell states its n (runs: one per seed)" if show_n else _runs_per_cell(counts[0])
    by_key = {(c["n_p"], c["share"], c["method"]): c for c in cells}
    grid = sorted({(c["n_p"], c["share"], c["discovery"]) for c in cells})
    lines = [f"## {study_title(study)}", "", f"Cells: {' / '.join(metrics)}; {n_text}.", "",
             "| poisoned images | discovered | " + " | ".join(cols) + " |", "|---:|---|" + "---|" * len(cols)]
    for n_p in sorted({g[0] for g in grid}):
        block = [g for g in grid if g[0] == n_p]
        for _, share, label in block:
            texts = [_cell_text(by_key.get((n_p, share, m)), metrics, show_n) for m in cols]
            lines.append(f"| {n_p} | {label} | " + " | ".join(texts) + " |")
        lines.append(_mean_line(str(n_p), means, n_p, cols, metrics, len(block)))
    lines += [_mean_line(ALL, means, ALL, cols, metrics, len(grid)), ""]
    return lines


def _runs_per_cell(n: int) -> str:
    """The n every cell shares, in words: ``n=3 runs per cell (one per seed)``, ``n=1 run per cell (no spread)``."""
    return f"n={n} run per cell (one seed: no ± spread)" if n == 1 else f"n={n} runs per cell (one per seed)"


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _cell_text(cell: Mapping[str, Any] | None, metrics: Sequence[str], show_n: bool) -> str:
    if cell is None:
        return "–"
    text = " / ".join(_fmt(cell[f"{m}_mean"], cell[f"{m}_std"]) for m in metrics)
    return f"{text} (n={cell['n_runs']})" if show_n else text


def _mean_line(first: str, means: Sequence[Mapping[str, Any]], n_p: Any, cols: Sequence[str],
               metrics: Sequence[str], n_grid: int) -> str:
    rows = {r["method"]: r for r in means if r["n_p"] == n_p}
    texts = []
    for method in cols:
        row = rows.get(method)
        if row is None:
            texts.append("–")
            continue
        text = " / ".join(_fmt(row[f"{m}_mean"], None) for m in metrics)
        texts.append(text if row["n_cells"] == n_grid else f"{text} ({row['n_cells']}/{n_grid} cells)")
    return f"| {first} | {MEAN} | " + " | ".join(texts) + " |"


def csv_text(cells: Sequence[Mapping[str, Any]]) -> str:
    """The cells and mean rows in long format (``CSV_COLUMNS``); empty fields for missing values."""
    return _csv([*cells, *summary_rows(cells)], CSV_COLUMNS)


def runs_csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """The measurements the tables count, one line per MLflow run (``RUN_COLUMNS``), to trace a number back."""
    out = []
    for row in with_columns(rows):
        out.append({**row, "method": row["column"], "discovery": discovery_of(row)[1]})
    out.sort(key=lambda r: (study_of(r), r["n_p"], r["share"], r["method"], r["seed"], r["run_id"]))
    return _csv(out, RUN_COLUMNS)


def models_markdown(models: Sequence[Mapping[str, Any]], rows: Iterable[Mapping[str, Any]] = ()) -> str:
    """The trained models of the store (training runs), one line each: their figures, the processor they were
    trained on (a CPU time is a figure of its machine) and how many of the report's cells heal them (a model of a
    retired config has none)."""
    cells = Counter(r.get("train_run") for r in rows)
    lines = ["# The trained models", "",
             "| attack | seed | n_p | clean_acc | asr | train_seconds | processor | config | cells | run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(models, key=lambda r: (attack_label(r["attack"], r["mapping"]), r["seed"], r["run_id"])):
        lines.append(f"| {attack_label(m['attack'], m['mapping'])} | {m['seed']} | {m['n_p'] if m['n_p'] else 0} | "
                     f"{_num(m['clean_acc'], 3)} | {_num(m['asr'], 3)} | {_num(m['train_seconds'], 0)} | "
                     f"{m['cpu'] or 'not recorded'} | `{m['config_hash']}` | "
                     f"{cells[m['config_hash']] or cells[m['run_id']]} | "
                     f"`{m['run_id']}` |")
    return "\n".join(lines) + "\n"


def compute_markdown(rows: Iterable[Mapping[str, Any]], models: Sequence[Mapping[str, Any]] = ()) -> str:
    """What the report's runs cost, per processor (a CPU time is a figure of its machine): each method's runs,
    their summed and mean seconds and mean passes over the data, the trained models' seconds, and the total."""
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r.get("cpu") or "not recorded"][r["method"]].append(r)
    trained: dict[str, list[float]] = defaultdict(list)
    for m in models:
        if _finite(m.get("train_seconds")):
            trained[m.get("cpu") or "not recorded"].append(m["train_seconds"])
    lines = ["# The study's compute", "",
             "Seconds are each run's wall clock on the processor it names (`unlearn_seconds`: the unlearning step, a "
             "PTN sweep's from its prepare job to its final job; `train_seconds`: a model's training); passes: "
             "`data_passes`, samples streamed through the model over the training set's size.", "",
             "| processor | what | runs | hours | mean seconds | mean passes |", "|---|---|---:|---:|---:|---:|"]
    for cpu in sorted(set(groups) | set(trained)):
        total = 0.0
        for method, own in sorted(groups[cpu].items()):
            seconds = [r["unlearn_seconds"] for r in own if _finite(r.get("unlearn_seconds"))]
            passes = [r.get("data_passes") for r in own]
            total += sum(seconds)
            lines.append(f"| {cpu} | {method} | {len(own)} | {sum(seconds) / 3600:.2f} | "
                         f"{_num(mean_std(seconds)[0], 1)} | {_num(mean_std(passes)[0], 1)} |")
        if trained[cpu]:
            total += sum(trained[cpu])
            lines.append(f"| {cpu} | trained models | {len(trained[cpu])} | {sum(trained[cpu]) / 3600:.2f} | "
                         f"{_num(mean_std(trained[cpu])[0], 1)} | |")
        lines.append(f"| {cpu} | **all** | {sum(map(len, groups[cpu].values())) + len(trained[cpu])} | "
                     f"**{total / 3600:.2f}** | | |")
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _num(value: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else "n/a"


def _csv(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in fields})
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return round(value, 6) if isinstance(value, float) else value
