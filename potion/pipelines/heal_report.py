"""potion.heal's words: report.md (a document to read, in percentages) and the console lines (fractions)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from potion.pipelines.next_steps import NEXT_LIST, format_next_steps


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _counts(hist: Mapping[str, int]) -> str:
    return ", ".join(f"`{c}` {n}" for c, n in hist.items()) or "none"


def format_report(s: Mapping[str, Any], with_plot: bool) -> str:
    """report.md: before/after on the test split, the discovered samples, the suspects, the PTN plot."""
    n_f, tgt = s["n_f"], s["target_class"]
    weights = Path(str(s["healed_weights"])).name
    lines = [
        f"# Healing report: `{Path(str(s['checkpoint'])).name}`", "",
        f"Healed with `{s['method']}` from {n_f} discovered poisoned training files in class folder `{tgt}` "
        f"(of {s['num_train']} training images). Healed weights: [{weights}]({weights}).", "",
        "| | before | after |", "|---|---|---|",
        f"| clean accuracy (test split, {s['num_test']} images) | {_pct(s['clean_acc_before'])} | "
        f"{_pct(s['clean_acc_after'])} |",
        f"| discovered samples predicted as their given label `{tgt}` | {_pct(s['discovered_given_label_before'])} | "
        f"{_pct(s['discovered_given_label_after'])} |",
    ]
    if s.get("trigger_known"):
        lines += [f"| attack success rate (known trigger on non-`{tgt}` test images) | {_pct(s['asr_before'])} | "
                  f"{_pct(s['asr_after'])} |",
                  f"| poison accuracy (known trigger on all test images) | {_pct(s['poison_acc_before'])} | "
                  f"{_pct(s['poison_acc_after'])} |"]
    drop = s.get("acc_drop")
    change = "n/a" if drop is None else f"{0.0 - drop:+.2f} percentage points"
    lines += ["", f"Clean accuracy change: {change}."
              + ("" if s.get("trigger_known") else " No trigger was given (`trigger=...`), so the attack success "
                 "rate is not measured."), ""]
    lines += ["## The discovered samples", "",
              f"Predicted classes of the {n_f} discovered samples before healing: "
              f"{_counts(s['discovered_predictions_before'])}.",
              f"After healing: {_counts(s['discovered_predictions_after'])}.", ""]
    if "top_suspects" in s:
        lines += ["## Suspects: likely undiscovered poison", "",
                  f"{s['suspects_flagged']} other training files score above the cut-off "
                  f"({s['suspect_cutoff']:.4g}; {s['suspects_flagged_in_target_folder']} of them in the `{tgt}` "
                  "folder, where poison sits). Score = how much healing lowered the model's belief in the file's "
                  "folder label. Full ranking: [suspects.csv](suspects.csv).", "",
                  "| rank | file | score |", "|---|---|---|"]
        lines += [f"| {t['rank']} | `{t['path']}` | {t['score']:.4g} |" for t in s["top_suspects"]]
        lines.append("")
    lines += _rounds_section(s)
    if with_plot:
        lines += ["## PTN search", "", "![PTN trajectory](ptn_trajectory.png)", ""]
        if s.get("ptn_steps") is not None:
            lines.append(f"Stopped after {int(s['ptn_steps'])} steps at forget accuracy "
                         f"{_pct(s.get('ptn_forget_acc'))} (threshold {_pct(s.get('ptn_threshold'))}), "
                         f"{_pct(s.get('ptn_dampened_share'))} of the parameters dampened.")
        if s.get("ptn_note"):
            lines.append(f"Note: {s['ptn_note']}.")
        lines.append("")
    lines += [f"Unlearning took {s['unlearn_seconds']:.1f} s on {s['device']}.", ""]
    lines += format_next_steps(s)
    return "\n".join(lines)


def _rounds_section(s: Mapping[str, Any]) -> list[str]:
    """An iterative method's rounds: forget set, PTN steps and suspects flagged per round; the repair."""
    n = int(s.get("rounds_run") or 0)
    if not n:
        return []
    limit = s.get("method_rounds")
    why = (f"the round limit (`method.rounds={int(limit)}`)" if limit is not None and n >= int(limit)
           else "no new suspect appeared")
    added = int(s.get("suspects_added", 0))
    steps = [s.get(f"round{r}_ptn_steps") for r in range(1, n + 1)]
    lines = ["## Suspect rounds", "",
             f"`{s['method']}` healed from your original weights in {n} round{'s' if n != 1 else ''}, each with the "
             f"forget set of the round before plus the suspects that round flagged, and stopped after round {n}: "
             f"{why}. It added {added} file{'s' if added != 1 else ''} to your {s['n_f']} discovered ones (treated "
             f"as poison; they head the suspects in [{NEXT_LIST}]({NEXT_LIST})).", "",
             "| round | forget set | PTN steps | suspects flagged |", "|---|---|---|---|"]
    lines += [f"| {r} | {int(s[f'round{r}_forget_size'])} | {'n/a' if k is None else int(k)} | "
              f"{int(s[f'round{r}_flagged'])} |" for r, k in enumerate(steps, start=1)]
    lines.append("")
    if s.get("repair_iterations"):
        lines += [f"Repair: {int(s['repair_iterations'])} fine-tuning steps at learning rate {s['repair_lr']:g} on the "
                  f"{int(s['repair_retain_samples'])} training files outside the final forget set "
                  f"({s['repair_seconds']:.1f} s); dampened weights stay as they are.", ""]
    return lines


def format_result(s: Mapping[str, Any]) -> str:
    """The console lines of ``python -m potion.heal``."""
    lines = [f"out folder: {s['out_dir']}",
             # fractions and percentage points, as unlearn.py prints them and MLflow stores them (README, Metrics)
             f"{s['method']}: n_f={s['n_f']}  clean_acc {s['clean_acc_before']:.4f} -> {s['clean_acc_after']:.4f}  "
             f"forget_acc {_frac(s['discovered_given_label_before'])} -> {_frac(s['discovered_given_label_after'])}"
             + (f"  asr {_frac(s['asr_before'])} -> {_frac(s['asr_after'])}" if s.get("trigger_known") else "")
             + f"  acc_drop={'n/a' if s.get('acc_drop') is None else format(s['acc_drop'], '.2f')}"]
    if "suspects_flagged" in s:
        lines.append(f"suspects above the cut-off: {s['suspects_flagged']} (ranking in suspects.csv)")
    if s.get("rounds_run"):
        lines.append(f"{s['method']}: {int(s['rounds_run'])} rounds, {s.get('suspects_added', 0)} suspects added to "
                     "the forget set")
    if s.get("ptn_note"):
        lines.append(f"note: {s['ptn_note']}")
    lines.append(f"next: confirm the suspects in {s['next_discovered']} (see report.md), then heal again:\n  "
                 f"{s['next_command']}")
    return "\n".join(lines)
