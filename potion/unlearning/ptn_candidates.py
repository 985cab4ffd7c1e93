"""PTN's stopping rule on evaluated candidates, without torch.

The ptn sweeper (``hydra_plugins/potion_ptn``) reduces its rounds with :func:`first_qualifying` in a
process that need not import torch (a cluster login node, or a joblib parent whose workers do the
tensor work); the in-process search (``potion.unlearning.ptn``) uses the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Candidate:
    """One evaluated step of the search."""

    step: int
    s: float
    percentile: float
    alpha: float
    dampened_share: float
    forget_acc: float

    def qualifies(self, threshold: float) -> bool:
        """forget_acc <= threshold (rho * a0); a NaN accuracy never qualifies."""
        return math.isfinite(self.forget_acc) and self.forget_acc <= threshold


def first_qualifying(candidates: list[Candidate], threshold: float) -> Candidate | None:
    """The smallest-step qualifying candidate of an evaluated block (parallel PTN's reduction)."""
    ok = [c for c in candidates if c.qualifies(threshold)]
    return min(ok, key=lambda c: c.step) if ok else None
