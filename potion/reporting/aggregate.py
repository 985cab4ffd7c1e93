"""Rows (one per measurement) -> cells and mean rows, and the plain-words labels tables and figures share.

A study is one (data set, model, attack, label mapping): two attacks or two models never meet in one cell.
A cell is one (study, poison size n_p, discovery setting, method column); it holds the mean and sample
std (ddof=1) over its runs, non-finite values left out. A method run with different settings in one
study gets a column per setting, named by the params that differ (``potion (ptn.rho=0.2)``).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from potion.core.declared import declared

SINGLE = "1 image"
MEAN = "mean"
ALL = "all"
STUDY_KEYS = ("dataset", "model", "attack", "mapping")
CELL_METRICS = ("healed", "healed_attainable", "acc_drop", "clean_acc", "asr", "unlearn_seconds", "data_passes")
SPREAD_METRICS = ("healed", "healed_attainable", "acc_drop", "asr")  # the ones with a std


# --------------------------------------------------------------------------- labels


def discovery_of(row: Mapping[str, Any]) -> tuple[float, str]:
    """A row's discovery setting: its share (1 image sits at 1/n_p) and how it is shown ("1 image" for n_f == 1,
    else the share as a percentage)."""
    if row.get("n_f") == 1:
        return 1 / row["n_p"], SINGLE
    return row["share"], f"{round(100 * row['share'], 4):g}%"


def study_of(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The (data set, model, attack, mapping) a row or cell belongs to."""
    return tuple(str(row[k]) for k in STUDY_KEYS)


def attack_label(attack: str, mapping: str) -> str:
    """An attack in plain words; the mapping only when it is not the usual all-to-one."""
    kind = declared("potion.data.triggers", "trigger_kind").get(attack)  # the kind's title, read without torch
    name = kind.options.get("title", attack) if kind is not None else attack
    return name if mapping in ("all_to_one", "") else f"{name}, {mapping.replace('_', '-')} labels"


def study_title(study: Sequence[str]) -> str:
    """``cifar10 · resnet9 · patch trigger (BadNets)``: how a study heads its table and figures."""
    dataset, model, attack, mapping = study
    return f"{dataset} · {model} · {attack_label(attack, mapping)}"


def study_suffixes(studies: Iterable[Sequence[str]]) -> dict[tuple[str, ...], str]:
    """File-name suffixes that tell studies apart: the parts that differ between them ("" for a single study)."""
    studies = sorted({tuple(s) for s in studies})
    varying = [i for i in range(len(STUDY_KEYS)) if len({s[i] for s in studies}) > 1]
    return {s: "".join(f"_{safe_name(s[i])}" for i in varying) for s in studies}


def safe_name(text: str) -> str:
    """``text`` as a safe file-name part."""
    return re.sub(r"[^\w.-]", "_", text).strip(".") or "x"


def with_columns(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Rows with ``column``: the method's name, plus the method params that differ within its study."""
    rows = [dict(r) for r in rows]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(study_of(row), row["method"])].append(row)
    for (_, method), members in groups.items():
        settings = [dict(m.get("method_params") or ()) for m in members]
        shared = set.intersection(*(set(s) for s in settings))
        varying = sorted(k for k in shared if len({s[k] for s in settings}) > 1)
        for member, own in zip(members, settings, strict=True):
            member["column"] = f"{method} ({', '.join(f'{k}={own[k]}' for k in varying)})" if varying else method
    return rows


# --------------------------------------------------------------------------- cells and mean rows


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Group rows into cells (study, n_p, discovery) x method column: means and stds over their runs.

    Cells come sorted by study, n_p, discovery share and column. Each holds the study keys, n_p,
    ``discovery`` (label), ``share`` (1 image is at 1/n_p), ``method`` (the column), ``base_method``,
    ``n_runs`` and ``<metric>_mean`` (``<metric>_std`` for ``SPREAD_METRICS``; None for one run).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in with_columns(rows):
        share, label = discovery_of(row)
        key = (*study_of(row), row["n_p"], round(share, 9), label, row["column"], row["method"])
        groups[key].append(row)
    cells = []
    for key, members in sorted(groups.items(), key=lambda kv: kv[0]):
        *study, n_p, share, label, column, method = key
        cell: dict[str, Any] = {**dict(zip(STUDY_KEYS, study, strict=True)), "n_p": n_p, "discovery": label,
                                "share": share, "method": column, "base_method": method, "n_runs": len(members)}
        for name in CELL_METRICS:
            mean, std = mean_std([m.get(name, math.nan) for m in members])
            cell[f"{name}_mean"] = mean
            if name in SPREAD_METRICS:
                cell[f"{name}_std"] = std
        cells.append(cell)
    return cells


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the finite values (None, None when there are none; std None for one)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def summary_rows(cells: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Mean rows: per (study, n_p) block and per study overall, the mean over cells of each column.

    Block rows have ``discovery="mean"``; overall rows also ``n_p="all"``. ``n_cells`` says over how
    many cells the mean was taken and ``n_runs`` how many runs those cells hold; stds are None. A
    metric some of those cells lack (healed_attainable of runs without a clean reference) has no mean,
    so every mean of a row is taken over the same cells.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for cell in cells:
        groups[(*study_of(cell), cell["n_p"], cell["method"])].append(cell)
        groups[(*study_of(cell), ALL, cell["method"])].append(cell)
    out = []
    for (*study, n_p, method), members in groups.items():
        row: dict[str, Any] = {**dict(zip(STUDY_KEYS, study, strict=True)), "n_p": n_p, "discovery": MEAN,
                               "share": None, "method": method, "base_method": members[0]["base_method"],
                               "n_runs": sum(m["n_runs"] for m in members), "n_cells": len(members)}
        for name in CELL_METRICS:
            values = [m.get(f"{name}_mean") for m in members]
            row[f"{name}_mean"] = None if None in values else mean_std(values)[0]
        row.update({f"{name}_std": None for name in SPREAD_METRICS})
        out.append(row)
    return sorted(out, key=lambda r: (study_of(r), r["n_p"] == ALL, r["n_p"] if r["n_p"] != ALL else 0, r["method"]))


def columns(cells: Sequence[Mapping[str, Any]], order: Sequence[str] | None = None) -> list[str]:
    """The method columns of ``cells``: those of the methods in ``order`` first (in that order), then the rest."""
    rank = {m: i for i, m in enumerate(order or ())}
    present = {(c["base_method"], c["method"]) for c in cells}
    return [col for base, col in sorted(present, key=lambda p: (rank.get(p[0], len(rank)), p[0], p[1]))]


def has_metric(cells: Iterable[Mapping[str, Any]], name: str) -> bool:
    """Whether any cell holds a value of ``name``."""
    return any(c.get(f"{name}_mean") is not None for c in cells)
