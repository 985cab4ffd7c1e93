"""The label-consistent attack (Turner et al. 2019), clean-label: a low-amplitude checkerboard in all four corners.

Added in pixel space (+amplitude on white squares, -amplitude on black ones) and clipped, so the patch is
faint on most images; the attack's strength comes from the training images being made hard to classify
(``eps``, ``pgd_steps``, ``pgd_step``: see potion/data/adversarial.py), which forces the network to rely on
the corners.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potion.config.schema import num
from potion.core.errors import ConfigError
from potion.data.triggers.base import AdditivePattern, PixelSpace, TriggerFields, trigger_kind


def corner_pattern(channels: int, height: int, width: int, size: int, amplitude: float) -> torch.Tensor:
    """A ``size`` x ``size`` +-amplitude/255 checkerboard (top-left square +) in each corner, zero elsewhere."""
    board = torch.tensor([[1.0 if (i + j) % 2 == 0 else -1.0 for j in range(size)] for i in range(size)])
    plane = torch.zeros(height, width)
    for r in (0, height - size):
        for c in (0, width - size):
            plane[r:r + size, c:c + size] = board
    return (amplitude / 255.0 * plane).view(1, 1, height, width).expand(1, channels, height, width).clone()


@trigger_kind("label_consistent", clean_label=True, surrogate=True, title="label-consistent (clean-label)")
@dataclass(frozen=True)
class LabelConsistent(TriggerFields):
    size: int = num(3, ge=1)  # checkerboard side
    amplitude: float = num(64.0, gt=0, le=255)  # +-amplitude on the 0-255 scale
    eps: float = num(8.0, gt=0, le=255)  # PGD L-inf budget (0-255 scale)
    pgd_steps: int = num(10, ge=0)
    pgd_step: float = num(2.0, gt=0, le=255)

    def check(self, channels: int, height: int, width: int) -> None:
        if self.size > min(height, width) // 2:
            raise ConfigError(f"poison.trigger.size={self.size}: must be between 1 and {min(height, width) // 2} "
                              f"for a {height}x{width} image")

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> AdditivePattern:
        pattern = corner_pattern(channels, height, width, self.size, self.amplitude)
        return AdditivePattern(PixelSpace(mean, std), pattern)
