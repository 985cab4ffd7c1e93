"""What every trigger kind shares: the call contract and the pixel-space round trip.

A trigger acts on *normalised* batches ``x`` [B, C, H, W] after augmentation (so its position and shape
are fixed). ``which`` selects rows: None = every row, a bool mask = rows where True, or uint8 codes
(0 clean, 1 trigger, 2 the attack's "noise mode": WaNet's randomly warped samples that keep their label).
Kinds defined in pixel space (values in [0, 1]) convert with the data set's mean/std and clip to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CLEAN, TRIGGER, NOISE = 0, 1, 2


def rows_with(which: torch.Tensor | None, code: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask of rows carrying ``code`` (None = every row, for code TRIGGER with ``which`` None)."""
    if which is None:
        return None if code == TRIGGER else torch.zeros(batch, dtype=torch.bool, device=device)
    w = which.to(device)
    if w.dtype == torch.bool:
        return w if code == TRIGGER else torch.zeros_like(w)
    return w == code


def select(x: torch.Tensor, changed: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``changed`` on ``rows`` (all rows when None), ``x`` elsewhere."""
    if rows is None:
        return changed
    return torch.where(rows.view(-1, 1, 1, 1), changed, x)


class PixelSpace:
    """Normalised <-> [0, 1] pixel values for one data set, constants cached per device and dtype."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = (self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype))
        return self._cache[key]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self._on(x)
        return x * s + m

    def from_pixels(self, p: torch.Tensor) -> torch.Tensor:
        m, s = self._on(p)
        return (p.clamp(0.0, 1.0) - m) / s


class PixelTrigger:
    """Base of the kinds defined on [0, 1] pixels: subclasses implement :meth:`pixels` (and :meth:`noise`)."""

    has_noise_mode = False

    def __init__(self, space: PixelSpace) -> None:
        self.space = space

    def pixels(self, p: torch.Tensor) -> torch.Tensor:
        """The triggered version of pixel batch ``p`` (values may leave [0, 1]; they are clipped after)."""
        raise NotImplementedError

    def noise(self, p: torch.Tensor) -> torch.Tensor:
        """The noise-mode version of ``p`` (kinds without a noise mode never receive code 2)."""
        return p

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        out = x
        if which is None or may_hold(which, TRIGGER):
            rows = rows_with(which, TRIGGER, x.shape[0], x.device)
            out = select(out, self.space.from_pixels(self.pixels(self.space.to_pixels(x))), rows)
        if self.has_noise_mode and which is not None and which.dtype != torch.bool:
            # the noise draws from the global random stream, so it is drawn only where a row needs it (reading
            # the codes, a device sync when they live on a GPU) to keep every later random number as it was
            noisy = rows_with(which, NOISE, x.shape[0], x.device)
            if bool(noisy.any()):
                out = select(out, self.space.from_pixels(self.noise(self.space.to_pixels(x))), noisy)
        return out


def may_hold(which: torch.Tensor, code: int) -> bool:
    """Whether rows coded ``code`` may be in ``which``: read on the CPU (free), assumed on a GPU (reading
    there waits for the device; the caller then computes the change for every row and selects, which gives
    the same values)."""
    if which.device.type != "cpu":
        return True
    if which.dtype == torch.bool:
        return code == TRIGGER and bool(which.any())
    return bool((which == code).any())
