"""The blended trigger (Chen et al. 2017): a fixed seeded random image alpha-blended over the whole image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potion.config.schema import num
from potion.data.triggers.base import TriggerFields, WeightedPattern, normalised, trigger_kind


@trigger_kind("blend", title="blended trigger")
@dataclass(frozen=True)
class Blend(TriggerFields):
    alpha: float = num(0.1, gt=0, le=1)  # the pattern's weight
    pattern_seed: int = 0  # the random pattern

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> WeightedPattern:
        mean_t, std_t = normalised(mean, std)
        weight = torch.full((1, channels, height, width), self.alpha)
        pixels = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(self.pattern_seed))
        return WeightedPattern(weight, (pixels - mean_t) / std_t)
