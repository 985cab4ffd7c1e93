"""Additive image-wide triggers defined on [0, 1] pixels: SIG and the FTrojan frequency trigger.

Both add one fixed pattern to the image and clip: SIG a horizontal sinusoid (Barni, Kallas, Tondi 2019),
FTrojan a sum of DCT basis images in the chroma channels (Wang et al. 2022). A DCT coefficient bump is
linear, so adding magnitude m to coefficient (u, v) of every block is exactly adding m times that
basis image: the trigger is computed once as a pixel pattern, not by transforming every batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from potion.data.triggers.base import PixelSpace, PixelTrigger

# BT.601 RGB -> YUV (rows: Y, U, V); its inverse brings a chroma pattern back to RGB
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])


class AdditivePattern(PixelTrigger):
    """``clip(p + pattern)`` with a fixed pattern [1, C, H, W] in [0, 1] units."""

    def __init__(self, space: PixelSpace, pattern: torch.Tensor) -> None:
        super().__init__(space)
        self.pattern = pattern
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def pixels(self, p: torch.Tensor) -> torch.Tensor:
        key = (p.device, p.dtype)
        if key not in self._cache:
            self._cache[key] = self.pattern.to(p.device, p.dtype)
        return p + self._cache[key]


def sig_pattern(channels: int, height: int, width: int, delta: float, frequency: float) -> torch.Tensor:
    """v(i, j) = delta/255 * sin(2 pi j f / width), the same on every row and channel."""
    j = torch.arange(width, dtype=torch.float32)
    row = (delta / 255.0) * torch.sin(2 * math.pi * j * frequency / width)
    return row.view(1, 1, 1, width).expand(1, channels, height, width).clone()


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (coefficients = D @ x @ D.T for an n x n block)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def ftrojan_block(block: int, frequencies: list[tuple[int, int]], magnitude: float) -> torch.Tensor:
    """The pixel pattern of one block: magnitude/255 times the sum of the chosen DCT basis images."""
    d = dct_matrix(block)
    out = torch.zeros(block, block, dtype=torch.float64)
    for u, v in frequencies:
        out += torch.outer(d[u], d[v])
    return (magnitude / 255.0 * out).float()


def ftrojan_pattern(channels: int, height: int, width: int, block: int, frequencies: list[tuple[int, int]],
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


def build_sig(spec: Any, channels: int, height: int, width: int, space: PixelSpace) -> AdditivePattern:
    return AdditivePattern(space, sig_pattern(channels, height, width, spec.delta, spec.frequency))


def ftrojan_block_size(spec: Any, height: int, width: int) -> int:
    """The DCT block: ``spec.block`` clipped to the image."""
    return min(int(spec.block), height, width)


def build_ftrojan(spec: Any, channels: int, height: int, width: int, space: PixelSpace) -> AdditivePattern:
    block = ftrojan_block_size(spec, height, width)
    freqs = list(spec.frequencies) if spec.frequencies is not None else default_frequencies(block)
    return AdditivePattern(space, ftrojan_pattern(channels, height, width, block, freqs, spec.magnitude))
