"""The study's targets, checked from the store: what the benchmark promises a reader, met or missed per attack.

Each target is a mean over seeds of a cell the report aggregates (no declared facts: the study declares none):

* potion at 10 % discovered: ``healed_attainable`` >= 90, ``asr`` <= 0.05, ``acc_drop`` <= 2 on every attack;
* potion from one discovered sample: ``healed_attainable`` >= 80 on every attack;
* against REM on every cell both ran: potion not worse (the paired test of :mod:`potion.reporting.compare`), at
  no more than 1/5 of REM's ``unlearn_seconds``.

A missed target is a row that says by how much; nothing is dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from potion.reporting.aggregate import SINGLE, study_of, study_title

TEN = "10%"
FLOORS = {(TEN, "healed_attainable"): 90.0, (SINGLE, "healed_attainable"): 80.0}
CEILINGS = {(TEN, "asr"): 0.05, (TEN, "acc_drop"): 2.0}
REM_TIME_SHARE = 0.2


def target_rows(cells: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]],
                method: str = "potion") -> list[dict]:
    """One row per (study, target): the measured mean, the bound, met or not, and n."""
    rows: list[dict] = []
    own = cells_of(cells, method)
    for (study, discovery), cell in sorted(own.items()):
        for (where, metric), bound in [*FLOORS.items(), *CEILINGS.items()]:
            if where != discovery:
                continue
            value = cell.get(f"{metric}_mean")
            floor = (where, metric) in FLOORS
            met = value is not None and (value >= bound if floor else value <= bound)
            rows.append({"study": study_title(study), "target": f"{method} at {discovery}: {metric} "
                         f"{'>=' if floor else '<='} {bound:g}", "value": value, "met": met, "n": cell["n_runs"]})
    rem = cells_of(cells, "rem")
    for key, theirs in sorted(rem.items()):
        mine = own.get(key)
        if mine is None:
            continue
        study, discovery = key
        verdicts = [e for e in comparisons if e["method"] == "rem" and e["discovery"] == discovery
                    and study_of(e) == study]
        worse = any(v == "worse" for e in verdicts for k, v in e.items() if k.endswith("_verdict"))
        pairs = min((int(e["n_pairs"]) for e in verdicts), default=0)
        ratio = _ratio(mine.get("unlearn_seconds_mean"), theirs.get("unlearn_seconds_mean"))
        value = "worse" if worse else "not worse" if pairs >= 2 else f"untested ({pairs} seed pair)"
        rows.append({"study": study_title(study), "target": f"{method} at {discovery} not worse than rem",
                     "value": value, "met": value == "not worse", "n": pairs})
        fast = ratio is not None and ratio <= REM_TIME_SHARE
        rows.append({"study": study_title(study), "target": f"{method} at {discovery}: time <= "
                     f"{REM_TIME_SHARE:g} x rem's", "value": ratio, "met": fast, "n": min(mine["n_runs"],
                                                                                         theirs["n_runs"])})
    return rows


def cells_of(cells: Sequence[Mapping[str, Any]], method: str) -> dict[tuple, Mapping[str, Any]]:
    """``method``'s cell per (study, discovery): its plain column, else its one column there. A setting the method
    resolves itself names the column where it differs within a study (potion's ``loss=auto`` is ``ce`` on an
    all-to-all attack at 10 % and ``logit_norm`` at one sample, where one label shows); it is still the cell."""
    found: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for cell in cells:
        if cell["base_method"] == method:
            found[(study_of(cell), cell["discovery"])].append(cell)
    out = {}
    for key, options in found.items():
        plain = [c for c in options if c["method"] == method]
        if plain or len(options) == 1:
            out[key] = (plain or options)[0]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def targets_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """targets.md: every target of every study, met or missed, with the measured value and n."""
    lines = ["# The study's targets", "", "Means over seeds (n); potion.reporting.targets says what each target is.",
             "", "| study | target | measured | met | n |", "|---|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        shown = "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['study']} | {r['target']} | {shown} | {'yes' if r['met'] else '**no**'} | {r['n']} |")
    if not rows:
        lines.append("| | no potion cell at 1 sample or 10 % yet | | | |")
    return "\n".join(lines) + "\n"
