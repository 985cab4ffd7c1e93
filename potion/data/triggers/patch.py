"""BadNets (Gu et al. 2017): a small square patch at a fixed place, one value or colour, on the label flip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from potion.config.schema import num
from potion.core.errors import ConfigError
from potion.data.triggers.base import TriggerFields, WeightedPattern, normalised, trigger_kind


def patch_origin(size: int, position: str, offset: Sequence[int] | None, height: int, width: int
                 ) -> tuple[int, int]:
    """Top-left (row, col) of a square patch at a named corner, or at an explicit offset."""
    if offset is not None:
        return int(offset[0]), int(offset[1])
    return {
        "bottom_right": (height - size, width - size),
        "bottom_left": (height - size, 0),
        "top_right": (0, width - size),
        "top_left": (0, 0),
    }[position]


@trigger_kind("patch", title="patch trigger (BadNets)")
@dataclass(frozen=True)
class Patch(TriggerFields):
    size: int = num(3, ge=1)  # the patch side
    position: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = "bottom_right"
    offset: list[int] | None = None  # [row, col] of the top-left pixel; overrides position
    value: float | None = None  # normalised value for every channel; None = the data set's brightest
    color: list[float] | None = num(None, ge=0, le=1)  # or a pixel colour in [0, 1]: one value or one per channel

    def check(self, channels: int, height: int, width: int) -> None:
        if self.size > min(height, width):
            raise ConfigError(f"poison.trigger.size={self.size}: must be between 1 and {min(height, width)} for a "
                              f"{height}x{width} image")
        if self.offset is not None:
            if len(self.offset) != 2 or not (0 <= self.offset[0] <= height - self.size
                                             and 0 <= self.offset[1] <= width - self.size):
                raise ConfigError(f"poison.trigger.offset={list(self.offset)}: the {self.size}x{self.size} patch "
                                  f"must fit inside the {height}x{width} image (give [row, col])")
        if self.color is not None and len(self.color) not in (1, channels):
            raise ConfigError(f"poison.trigger.color={list(self.color)}: give 1 or {channels} values in [0, 1]")

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> WeightedPattern:
        mean_t, std_t = normalised(mean, std)
        weight = torch.zeros(1, channels, height, width)
        r, c = patch_origin(self.size, self.position, self.offset, height, width)
        weight[:, :, r:r + self.size, c:c + self.size] = 1.0
        if self.color is not None:
            color = torch.tensor(self.color, dtype=torch.float32)
            color = color.expand(channels) if color.numel() == 1 else color
            pattern = ((color.view(1, -1, 1, 1) - mean_t) / std_t).expand(1, channels, height, width)
        else:
            value = self.value if self.value is not None else float(((1.0 - mean_t) / std_t).max())
            pattern = torch.full((1, channels, height, width), value)
        return WeightedPattern(weight, pattern)
