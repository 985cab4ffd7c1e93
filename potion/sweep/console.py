"""What a PTN sweep prints: a line for the prepare job, one per round, one for the answer (the launcher's own lines
are silenced), and where the results wait when the tracking server went away."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from potion.tracking.runs import replay_command
from potion.unlearning.ptn_candidates import Candidate


def say(text: str) -> None:
    print(text, flush=True)


def prepare_line(prep: dict[str, Any], max_steps: int) -> str:
    return (f"PTN sweep: importances {'from the cache' if prep['importance_cache_hit'] else 'computed'} in "
            f"{prep['importance_seconds']:.2f} s (n_f={prep['n_f']} of {prep['n_p']} poisoned); forget_acc "
            f"{prep['a0']:.4f} before, the search stops at <= {prep['threshold']:.4f} (up to {max_steps} steps)")


def round_line(number: int, rounds: int, cands: list[Candidate], chosen: Candidate | None, threshold: float,
               seconds: float) -> str:
    """One round of candidate jobs: its steps and whether one qualifies."""
    by_step = sorted(cands, key=lambda c: c.step)
    if chosen is not None:
        found = f"k={chosen.step} qualifies (forget_acc {chosen.forget_acc:.4f} <= {threshold:.4f})"
    else:
        found = (f"forget_acc {by_step[0].forget_acc:.4f} .. {by_step[-1].forget_acc:.4f}, none at or below "
                 f"{threshold:.4f}")
    return (f"PTN round {number} of at most {rounds} (steps {by_step[0].step}..{by_step[-1].step}): {found}; "
            f"{seconds:.1f} s")


def result_line(launcher: str, batch_size: int, chosen: Candidate, prep: dict[str, Any], result: dict[str, Any],
                evaluated: int, sweep_dir: Path) -> str:
    return (f"PTN sweep ({launcher}, rounds of {batch_size}): k={chosen.step} s={chosen.s:.4g} "
            f"alpha={chosen.alpha:.4g} forget_acc {prep['a0']:.4f} -> {chosen.forget_acc:.4f} (threshold "
            f"{prep['threshold']:.4f}, reached={result['ptn_reached']}); {evaluated} candidates in "
            f"{result['ptn_rounds']} rounds, {result['ptn_wall_seconds']:.1f} s; sweep folder {sweep_dir}")


def reused_line(earlier: dict[str, Any], experiment: str) -> str:
    return (f"PTN sweep already finished: k={earlier.get('ptn_chosen_step')} (MLflow run "
            f"{earlier['reused_parent_run_id']} in experiment {experiment}, sweep folder "
            f"{earlier.get('reused_sweep_dir')}); nothing logged again (force=true runs it again)")


def warn_tracking_lost(parent: Any, sweep_dir: Path, pending: Path | None) -> None:
    """After a sweep whose tracking server went away: where the results are, and how to log them later."""
    if pending is None and not getattr(parent, "offline", False):
        return
    text = (f"warning: the MLflow tracking server {parent.tracking_uri} went away during the sweep; its results are "
            f"on disk (sweep folder {sweep_dir}: ptn_sweep.json, ptn_trajectory.csv")
    if pending is not None:
        text += (f"; final run folder {pending}). Once the server is back, log the final run with: "
                 f"{replay_command(pending, parent.tracking_uri)}")
    else:
        text += ")"
    print(text, file=sys.stderr, flush=True)
