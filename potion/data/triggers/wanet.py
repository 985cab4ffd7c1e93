"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warp of the whole image as the trigger.

A seeded k x k field of random flow offsets, normalised to mean |offset| 1, is upsampled (bicubic) to
the image and scaled by ``strength / size``; ``grid_sample`` moves every pixel along it. Noise mode:
samples of code 2 get the same warp plus fresh uniform noise of up to one pixel per call and keep their
true label, which teaches the network that *other* warps mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potion.config.schema import num
from potion.core.errors import ConfigError
from potion.data.triggers.base import PixelSpace, PixelTrigger, TriggerFields, cached_like, trigger_kind


def warp_grid(height: int, width: int, grid_size: int, strength: float, seed: int) -> torch.Tensor:
    """The fixed sampling grid [1, H, W, 2] (x, y in [-1, 1]) of the trigger warp."""
    gen = torch.Generator().manual_seed(int(seed))
    ctrl = torch.rand(1, 2, grid_size, grid_size, generator=gen) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean()
    flow = F.interpolate(ctrl, size=(height, width), mode="bicubic", align_corners=True)  # [1, 2, H, W]
    flow = flow.permute(0, 2, 3, 1)  # [1, H, W, 2] as (x, y)
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack([gx, gy], dim=-1).unsqueeze(0)
    scale = torch.tensor([strength / width, strength / height]).view(1, 1, 1, 2)
    return (identity + flow * scale).clamp(-1, 1)


class Warp(PixelTrigger):
    """grid_sample with the fixed trigger grid (noise mode: plus per-sample random jitter)."""

    has_noise_mode = True

    def __init__(self, space: PixelSpace, grid: torch.Tensor) -> None:
        super().__init__(space)
        self.grid = grid
        self._cache: dict = {}

    def _sample(self, p: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(p, grid.expand(p.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border",
                             align_corners=True)

    def pixels(self, p: torch.Tensor) -> torch.Tensor:
        return self._sample(p, cached_like(self._cache, p, self.grid)[0])

    def noise(self, p: torch.Tensor) -> torch.Tensor:
        b, _, h, w = p.shape
        jitter = (torch.rand(b, h, w, 2, device=p.device, dtype=p.dtype) * 2 - 1)
        jitter = jitter * torch.tensor([1.0 / w, 1.0 / h], device=p.device, dtype=p.dtype)
        return self._sample(p, (cached_like(self._cache, p, self.grid)[0] + jitter).clamp(-1, 1))


@trigger_kind("wanet", noise_mode=True, title="WaNet warp")
@dataclass(frozen=True)
class WaNet(TriggerFields):
    grid_size: int = num(4, ge=2)  # the control grid's side k
    strength: float = num(0.5, gt=0)  # s: offsets of up to about s pixels
    warp_seed: int = 0  # the random control grid
    noise_ratio: float = num(2.0, ge=0)  # noise-mode samples per poisoned sample; 0 = no noise mode

    def check(self, channels: int, height: int, width: int) -> None:
        if self.grid_size > min(height, width):
            raise ConfigError(f"poison.trigger.grid_size={self.grid_size}: must be in [2, {min(height, width)}]")
        if self.strength > max(height, width):
            raise ConfigError(f"poison.trigger.strength={self.strength}: must be in (0, {max(height, width)}]")

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]) -> Warp:
        return Warp(PixelSpace(mean, std), warp_grid(height, width, self.grid_size, self.strength, self.warp_seed))
