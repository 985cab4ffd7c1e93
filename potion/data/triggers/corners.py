"""The label-consistent attack's trigger (Turner et al. 2019): a low-amplitude checkerboard in all four corners.

Added in pixel space (+amplitude on white squares, -amplitude on black ones) and clipped, so the patch is
faint on most images; the attack's strength comes from the training images being made hard to classify
(see potion/data/adversarial.py), which forces the network to rely on the corners.
"""

from __future__ import annotations

from typing import Any

import torch

from potion.data.triggers.additive import AdditivePattern
from potion.data.triggers.base import PixelSpace


def corner_pattern(channels: int, height: int, width: int, size: int, amplitude: float) -> torch.Tensor:
    """A ``size`` x ``size`` +-amplitude/255 checkerboard (top-left square +) in each corner, zero elsewhere."""
    board = torch.tensor([[1.0 if (i + j) % 2 == 0 else -1.0 for j in range(size)] for i in range(size)])
    plane = torch.zeros(height, width)
    for r in (0, height - size):
        for c in (0, width - size):
            plane[r:r + size, c:c + size] = board
    return (amplitude / 255.0 * plane).view(1, 1, height, width).expand(1, channels, height, width).clone()


def build_corners(spec: Any, channels: int, height: int, width: int, space: PixelSpace) -> AdditivePattern:
    return AdditivePattern(space, corner_pattern(channels, height, width, spec.size, spec.amplitude))
