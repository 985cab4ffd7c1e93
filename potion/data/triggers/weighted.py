"""BadNets patch and the blended trigger: one formula in normalised space, ``x + w * (p - x)``.

A patch has weight 1 inside the patch and 0 elsewhere (pattern: one value or colour); a blend has
weight ``alpha`` everywhere and a fixed seeded random image as pattern (Chen et al. 2017).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from potion.data.triggers.base import TRIGGER, rows_with, select


def patch_origin(size: int, position: str, offset: tuple[int, int] | None, height: int, width: int
                 ) -> tuple[int, int]:
    """Top-left (row, col) of a square patch at a named corner, or at an explicit offset."""
    if offset is not None:
        return offset
    return {
        "bottom_right": (height - size, width - size),
        "bottom_left": (height - size, 0),
        "top_right": (0, width - size),
        "top_left": (0, 0),
    }[position]


class WeightedPattern:
    """``x + w * (p - x)`` with a weight map ``w`` and a pattern ``p``, both in normalised units."""

    def __init__(self, weight: torch.Tensor, pattern: torch.Tensor) -> None:
        self.weight = weight.contiguous()
        self.pattern = pattern.contiguous()
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = (self.weight.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype))
        return self._cache[key]

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        w, p = self._on(x)
        return select(x, x + w * (p - x), rows_with(which, TRIGGER, x.shape[0], x.device))


def build_patch(spec: Any, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
                ) -> WeightedPattern:
    """The BadNets patch: ``size`` x ``size`` at a corner / offset, a value (default: the brightest) or colour."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    weight = torch.zeros(1, channels, height, width)
    r, c = patch_origin(spec.size, spec.position, spec.offset, height, width)
    weight[:, :, r:r + spec.size, c:c + spec.size] = 1.0
    if spec.color is not None:
        color = torch.tensor(spec.color, dtype=torch.float32)
        color = color.expand(channels) if color.numel() == 1 else color
        pattern = ((color.view(1, -1, 1, 1) - mean_t) / std_t).expand(1, channels, height, width)
    else:
        value = spec.value if spec.value is not None else float(((1.0 - mean_t) / std_t).max())
        pattern = torch.full((1, channels, height, width), value)
    return WeightedPattern(weight, pattern)


def build_blend(spec: Any, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
                ) -> WeightedPattern:
    """The blended trigger: a seeded uniform random image mixed in with weight ``alpha``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    weight = torch.full((1, channels, height, width), float(spec.alpha))
    gen = torch.Generator().manual_seed(spec.pattern_seed)
    pixels = torch.rand(1, channels, height, width, generator=gen)
    return WeightedPattern(weight, (pixels - mean_t) / std_t)
