"""Batch-wise augmentation and normalisation on tensors (no per-sample Python work on the hot path)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 or float batch [B, C, H, W], all at once."""
    b, c, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dev = images.device
        dy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # [B, H]
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # [B, W]
        bidx = torch.arange(b, device=dev)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, device=images.device, generator=generator) < 0.5
        out = torch.where(mask.view(-1, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


class Normalizer:
    """uint8 [0, 255] -> float, standardised per channel; constants cached per device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        dev = images.device
        if dev not in self._cache:
            self._cache[dev] = ((self.mean * 255.0).to(dev), (self.std * 255.0).to(dev))
        m, s = self._cache[dev]
        return (images.float() - m) / s

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images back to stored pixels: uint8, rounded and clipped as an image file holds them."""
        m, s = self.mean.to(x.device) * 255.0, self.std.to(x.device) * 255.0
        return (x * s + m).round().clamp(0, 255).to(torch.uint8)
