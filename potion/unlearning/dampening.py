"""Selective Synaptic Dampening: select parameters far more important to the forget set, shrink them.

theta_i <- theta_i * min(lambda * Omega_r[i] / Omega_f[i], 1) where Omega_f[i] > alpha * Omega_r[i]
(method.md §4). Parameters never grow. The percentile rule picks alpha from the pooled ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from potion.core.errors import ConfigError


def percentile_for_share(s: float) -> float:
    """ASSD's percentile p = 100 - ln(1 + 100 s) for an assumed poisoned share s (clamped to [0, 100])."""
    if s < 0:
        raise ConfigError(f"assumed poisoned share s={s}: must be >= 0")
    return min(100.0, max(0.0, 100.0 - math.log1p(100.0 * s)))


@dataclass
class RatioPool:
    """The sorted finite ratios Omega_f / Omega_r of all parameters, pooled once for the percentile rule."""

    sorted_ratios: torch.Tensor

    @staticmethod
    def build(imp_r: dict[str, torch.Tensor], imp_f: dict[str, torch.Tensor]) -> RatioPool:
        """Pool every parameter's ratio, dropping NaN and inf (0/0 and x/0)."""
        ratios = torch.cat([(imp_f[n] / imp_r[n]).flatten() for n in imp_r])
        finite = ratios[torch.isfinite(ratios)]
        return RatioPool(torch.sort(finite.float()).values)

    def percentile(self, p: float) -> float:
        """Value at the p-th percentile with linear interpolation (numpy's default), p in [0, 100]."""
        n = self.sorted_ratios.numel()
        if n == 0:
            return float("inf")
        pos = min(max(p, 0.0), 100.0) / 100.0 * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        a, b = float(self.sorted_ratios[lo]), float(self.sorted_ratios[hi])
        return a + (b - a) * (pos - lo)


@dataclass
class DampenResult:
    """What one dampening did: how many parameters it selected, out of how many."""

    selected: int
    total: int

    @property
    def share(self) -> float:
        return self.selected / max(1, self.total)


@torch.no_grad()
def dampen_(model: nn.Module, originals: dict[str, torch.Tensor], imp_r: dict[str, torch.Tensor],
            imp_f: dict[str, torch.Tensor], alpha: float, lam: float = 1.0) -> DampenResult:
    """Write dampened ``originals`` into ``model``'s parameters (in place) and report the selection.

    Parameters not selected are reset to their original values, so one model can be dampened again and
    again at different alphas (PTN) without copying it.
    """
    if not alpha >= 0:
        raise ConfigError(f"ssd alpha={alpha}: must be >= 0")
    if not lam > 0:
        raise ConfigError(f"ssd lambda={lam}: must be > 0")
    params = dict(model.named_parameters())
    selected = total = 0
    for name, orig in originals.items():
        r, f = imp_r[name], imp_f[name]
        mask = f > alpha * r
        factor = torch.where(mask, (lam * r / f).clamp(max=1.0), torch.ones_like(f))
        factor = torch.nan_to_num(factor, nan=1.0, posinf=1.0, neginf=1.0)
        params[name].copy_(orig * factor.to(orig.dtype))
        selected += int(mask.sum())
        total += mask.numel()
    return DampenResult(selected, total)


def snapshot(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters (the undamped originals)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in (names or list(params))}
