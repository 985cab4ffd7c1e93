"""SIG (Barni, Kallas, Tondi 2019), clean-label: a horizontal sinusoid added to target-class images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potion.config.schema import num
from potion.core.errors import ConfigError
from potion.data.triggers.base import AdditivePattern, PixelSpace, TriggerFields, trigger_kind


def sig_pattern(channels: int, height: int, width: int, delta: float, frequency: float) -> torch.Tensor:
    """v(i, j) = delta/255 * sin(2 pi j f / width), the same on every row and channel."""
    j = torch.arange(width, dtype=torch.float32)
    row = (delta / 255.0) * torch.sin(2 * math.pi * j * frequency / width)
    return row.view(1, 1, 1, width).expand(1, channels, height, width).clone()


@trigger_kind("sig", clean_label=True, title="SIG sinusoid (clean-label)")
@dataclass(frozen=True)
class Sig(TriggerFields):
    delta: float = num(20.0, gt=0, le=255)  # amplitude on the 0-255 scale
    frequency: float = num(6.0, gt=0)  # periods across the image width

    def check(self, channels: int, height: int, width: int) -> None:
        if self.frequency > width / 2:
            raise ConfigError(f"poison.trigger.frequency={self.frequency}: must be in (0, {width / 2:g}]")

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> AdditivePattern:
        return AdditivePattern(PixelSpace(mean, std), sig_pattern(channels, height, width, self.delta, self.frequency))
