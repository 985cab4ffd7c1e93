"""Which method is better than which, per cell, and only where the seeds say so.

Two methods of one cell (study, n_p, discovery) are compared on the runs they share a seed with: the study's
``seed`` is one (training seed, discovery draw) pair, so a pair of runs sees the same poisoned model and the same
discovered samples. On each metric the paired differences go through a two-sided paired t-test at 5 %: a method
is called better only when the test rejects "no difference" and the mean difference favours it; with fewer than
two pairs, or differences that all vanish, nothing is called. Higher is better for ``healed_attainable`` and
``healed``, lower for ``acc_drop`` and ``asr``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from potion.reporting.aggregate import STUDY_KEYS, discovery_of

# two-sided 5 % critical values of Student's t by degrees of freedom (df > 30: the normal's 1.96 is within 4 %)
T_CRIT = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
HIGHER_IS_BETTER = {"healed_attainable": True, "healed": True, "acc_drop": False, "asr": False}
COMPARED = ("healed_attainable", "acc_drop", "asr")


def paired_verdict(diffs: Sequence[float]) -> tuple[float | None, bool]:
    """(mean difference, whether a two-sided paired t-test at 5 % rejects no difference) of finite ``diffs``."""
    d = [x for x in diffs if math.isfinite(x)]
    if len(d) < 2:
        return (d[0] if d else None), False
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        return mean, mean != 0
    t = abs(mean) / (sd / math.sqrt(len(d)))
    return mean, t > (T_CRIT[len(d) - 2] if len(d) - 2 < len(T_CRIT) else 1.96)


def comparisons(rows: Iterable[Mapping[str, Any]], reference: str = "potion") -> list[dict]:
    """``reference`` against every other method of each cell: per metric the mean paired difference (reference
    minus other), n pairs and the verdict (``better``, ``worse`` or ``no difference shown``)."""
    cells: dict[tuple, dict[str, dict[str, Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        key = (*(row[k] for k in STUDY_KEYS), row["n_p"], discovery_of(row)[1])
        cells[key][row["method"]][str(row.get("seed"))] = row
    out = []
    for key, by_method in sorted(cells.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        own = by_method.get(reference)
        if not own:
            continue
        for other, theirs in sorted(by_method.items()):
            if other == reference:
                continue
            seeds = sorted(set(own) & set(theirs))
            entry: dict[str, Any] = {**dict(zip(STUDY_KEYS, key[:4], strict=True)), "n_p": key[4],
                                     "discovery": key[5], "method": other, "n_pairs": len(seeds)}
            for metric in COMPARED:
                diffs = [float(own[s].get(metric, math.nan)) - float(theirs[s].get(metric, math.nan)) for s in seeds]
                mean, significant = paired_verdict(diffs)
                favours = mean is not None and (mean > 0) == HIGHER_IS_BETTER[metric] and mean != 0
                entry[f"{metric}_diff"] = mean
                verdict = ("better" if favours else "worse") if significant else "no difference shown"
                entry[f"{metric}_verdict"] = verdict
            out.append(entry)
    return out


def comparisons_markdown(entries: Sequence[Mapping[str, Any]], reference: str = "potion") -> str:
    """One table per study: reference vs each method, mean paired difference and verdict per metric."""
    lines = [f"# {reference} against each method, paired by seed", "",
             "Each cell: mean of the paired differences (" + reference + " minus the method) over the seeds both ran, "
             "and the verdict of a two-sided paired t-test at 5 % (better / worse / no difference shown); n: pairs. "
             "healed_attainable in %, acc_drop in percentage points, asr as a fraction (potion.reporting.compare).", ""]
    studies: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for e in entries:
        studies[tuple(e[k] for k in STUDY_KEYS)].append(e)
    for study, rows in studies.items():
        lines += [f"## {' / '.join(str(s) for s in study)}", "",
                  "| n_p | discovery | method | n | healed_attainable | acc_drop | asr |",
                  "|---|---|---|---|---|---|---|"]
        for e in rows:
            cells = [_cell(e.get(f"{m}_diff"), e[f"{m}_verdict"], 3 if m == "asr" else 2) for m in COMPARED]
            head = f"| {e['n_p']} | {e['discovery']} | {e['method']} | {e['n_pairs']} | "
            lines.append(head + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(diff: float | None, verdict: str, digits: int) -> str:
    return "n/a" if diff is None or not math.isfinite(diff) else f"{diff:+.{digits}f} ({verdict})"
