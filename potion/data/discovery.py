"""Which poisoned samples the defender discovered: nested, seeded forget sets (method.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potion.core.errors import ConfigError
from potion.data.poison import PoisonPlan


@dataclass(frozen=True)
class Discovery:
    """The forget set (discovered poisoned indices, in discovery order) and the retain set (everything else)."""

    forget_idx: torch.Tensor
    retain_idx: torch.Tensor
    seed: int

    @property
    def n_f(self) -> int:
        return int(self.forget_idx.numel())


def discovered_count(n_p: int, share: float | None = None, count: int | None = None) -> int:
    """n_f from ``discovery.count`` or ``discovery.share`` (a share rounds to at least one sample)."""
    if n_p < 1:
        raise ConfigError("discovery: the training run has no poisoned samples, so nothing can be discovered")
    if count is not None:
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= n_p:
            raise ConfigError(f"discovery.count={count}: must be an integer in [1, {n_p}] (n_p = {n_p})")
        return count
    if share is None:
        raise ConfigError("discovery: set discovery.share (in (0, 1]) or discovery.count (in [1, n_p])")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) <= 1.0:
        raise ConfigError(f"discovery.share={share}: must be in (0, 1] (0 discovers no poisoned sample; "
                          "use discovery.count=1 for a single sample)")
    return max(1, int(round(float(share) * n_p)))


def discover(plan: PoisonPlan, *, share: float | None = None, count: int | None = None, seed: int = 0
             ) -> Discovery:
    """The first n_f of one seeded permutation of the poisoned indices, so sets for growing n_f are nested."""
    n_f = discovered_count(plan.count, share, count)
    poisoned = torch.tensor(plan.indices, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    forget = poisoned[torch.randperm(len(poisoned), generator=gen)[:n_f]]
    keep = torch.ones(plan.num_train, dtype=torch.bool)
    keep[forget] = False
    return Discovery(forget_idx=forget, retain_idx=torch.nonzero(keep).view(-1), seed=int(seed))
