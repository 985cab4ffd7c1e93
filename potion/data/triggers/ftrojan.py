"""FTrojan (Wang et al. 2022): a fixed bump of chosen DCT frequencies in the chroma channels, invisible in pixels.

A DCT coefficient bump is linear, so adding magnitude m to coefficient (u, v) of every block is exactly adding
m times that basis image: the trigger is computed once as a pixel pattern, not by transforming every batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potion.config.schema import num
from potion.core.errors import ConfigError
from potion.data.triggers.base import AdditivePattern, PixelSpace, TriggerFields, trigger_kind

# BT.601 RGB -> YUV (rows: Y, U, V); its inverse brings a chroma pattern back to RGB
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (coefficients = D @ x @ D.T for an n x n block)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def ftrojan_block(block: int, frequencies: Sequence[Sequence[int]], magnitude: float) -> torch.Tensor:
    """The pixel pattern of one block: magnitude/255 times the sum of the chosen DCT basis images."""
    d = dct_matrix(block)
    out = torch.zeros(block, block, dtype=torch.float64)
    for u, v in frequencies:
        out += torch.outer(d[u], d[v])
    return (magnitude / 255.0 * out).float()


def ftrojan_pattern(channels: int, height: int, width: int, block: int, frequencies: Sequence[Sequence[int]],
                    magnitude: float) -> torch.Tensor:
    """The block pattern tiled over every whole block, put in U and V (RGB) or the only channel (grey)."""
    tile = ftrojan_block(block, frequencies, magnitude)
    plane = torch.zeros(height, width)
    for r in range(0, height - block + 1, block):
        for c in range(0, width - block + 1, block):
            plane[r:r + block, c:c + block] = tile
    if channels == 1:
        return plane.view(1, 1, height, width)
    yuv = torch.stack([torch.zeros_like(plane), plane, plane])  # the bump in U and V, none in Y
    rgb = torch.einsum("ij,jhw->ihw", torch.linalg.inv(RGB_TO_YUV), yuv)
    if channels != 3:
        rgb = rgb.mean(0, keepdim=True).expand(channels, height, width)
    return rgb.reshape(1, channels, height, width).contiguous()


def default_frequencies(block: int) -> list[tuple[int, int]]:
    """FTrojan's (15, 15) and (31, 31) for 32-pixel blocks, scaled to the block: mid and highest frequency."""
    return [(block // 2 - 1, block // 2 - 1), (block - 1, block - 1)]


@trigger_kind("ftrojan", title="FTrojan (frequency domain)")
@dataclass(frozen=True)
class FTrojan(TriggerFields):
    magnitude: float = num(30.0, gt=0, le=2040)  # added to each chosen DCT coefficient, on the 0-255 scale
    frequencies: list[list[int]] | None = num(None, ge=0)  # [[u, v], ...]; None = mid and highest of the block
    block: int = num(32, ge=2)  # DCT block side (clipped to the image)

    def block_size(self, height: int, width: int) -> int:
        """The DCT block: ``block`` clipped to the image."""
        return min(self.block, height, width)

    def check(self, channels: int, height: int, width: int) -> None:
        block = self.block_size(height, width)
        if block < 2:
            raise ConfigError(f"poison.trigger.block={self.block}: a {height}x{width} image holds no 2x2 block")
        for pair in self.frequencies or ():
            if len(pair) != 2 or not all(k < block for k in pair):
                raise ConfigError(f"poison.trigger.frequencies: {list(pair)} is not a (u, v) pair inside the "
                                  f"{block}x{block} DCT block of this {height}x{width} image; use frequencies below "
                                  f"{block}")

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> AdditivePattern:
        block = self.block_size(height, width)
        freqs = self.frequencies if self.frequencies is not None else default_frequencies(block)
        pattern = ftrojan_pattern(channels, height, width, block, freqs, self.magnitude)
        return AdditivePattern(PixelSpace(mean, std), pattern)
