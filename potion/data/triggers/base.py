"""What every trigger kind shares: how a kind declares itself, the call contract and the pixel-space round trip.

A kind is one module in this package: a frozen dataclass of its settings (``poison.trigger.*``, with defaults and,
through :func:`potion.config.schema.num`, their ranges), decorated with ``@trigger_kind("name", ...)`` and
implementing ``check`` (the rules that need the image size) and ``build`` (the trigger function object). The config
check reads the same declaration before torch is imported (:mod:`potion.core.declared`).

A trigger acts on *normalised* batches ``x`` [B, C, H, W] after augmentation (so its position and shape
are fixed). ``which`` selects rows: None = every row, a bool mask = rows where True, or uint8 codes
(0 clean, 1 trigger, 2 the attack's "noise mode": WaNet's randomly warped samples that keep their label).
Kinds defined in pixel space (values in [0, 1]) convert with the data set's mean/std and clip to [0, 1].
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import cache
from typing import Any, Union

import torch

from potion.core.errors import ConfigError

CLEAN, TRIGGER, NOISE = 0, 1, 2


def rows_with(which: torch.Tensor | None, code: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask of rows carrying ``code`` (None = every row, for code TRIGGER with ``which`` None)."""
    if which is None:
        return None if code == TRIGGER else torch.zeros(batch, dtype=torch.bool, device=device)
    w = which.to(device)
    if w.dtype == torch.bool:
        return w if code == TRIGGER else torch.zeros_like(w)
    return w == code


def cached_like(cache: dict, x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` on ``x``'s device and dtype, moved once per (device, dtype) and kept in ``cache``."""
    key = (x.device, x.dtype)
    if key not in cache:
        cache[key] = tuple(t.to(x.device, x.dtype) for t in tensors)
    return cache[key]


def select(x: torch.Tensor, changed: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``changed`` on ``rows`` (all rows when None), ``x`` elsewhere."""
    if rows is None:
        return changed
    return torch.where(rows.view(-1, 1, 1, 1), changed, x)


class PixelSpace:
    """Normalised <-> [0, 1] pixel values for one data set, constants cached per device and dtype."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = normalised(mean, std)
        self._cache: dict = {}

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        m, s = cached_like(self._cache, x, self.mean, self.std)
        return x * s + m

    def from_pixels(self, p: torch.Tensor) -> torch.Tensor:
        m, s = cached_like(self._cache, p, self.mean, self.std)
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


class WeightedPattern:
    """``x + w * (p - x)`` with a weight map ``w`` and a pattern ``p``, both in normalised units (patch, blend)."""

    def __init__(self, weight: torch.Tensor, pattern: torch.Tensor) -> None:
        self.weight = weight.contiguous()
        self.pattern = pattern.contiguous()
        self._cache: dict = {}

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        w, p = cached_like(self._cache, x, self.weight, self.pattern)
        return select(x, x + w * (p - x), rows_with(which, TRIGGER, x.shape[0], x.device))


class AdditivePattern(PixelTrigger):
    """``clip(p + pattern)`` with a fixed pattern [1, C, H, W] in [0, 1] units (sig, ftrojan, label_consistent)."""

    def __init__(self, space: PixelSpace, pattern: torch.Tensor) -> None:
        super().__init__(space)
        self.pattern = pattern
        self._cache: dict = {}

    def pixels(self, p: torch.Tensor) -> torch.Tensor:
        return p + cached_like(self._cache, p, self.pattern)[0]


def normalised(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's mean and std as [1, C, 1, 1] tensors."""
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def may_hold(which: torch.Tensor, code: int) -> bool:
    """Whether rows coded ``code`` may be in ``which``: read on the CPU (free), assumed on a GPU (reading
    there waits for the device; the caller then computes the change for every row and selects, which gives
    the same values)."""
    if which.device.type != "cpu":
        return True
    if which.dtype == torch.bool:
        return code == TRIGGER and bool(which.any())
    return bool((which == code).any())


# ------------------------------------------------------------------------------------------ declaring a kind


class TriggerFields:
    """Base of a kind's settings. Values are turned into their annotated types on construction (integers checked,
    lists kept as tuples so a spec is hashable); their ranges are checked with the image size, by
    :func:`potion.data.poison.validate_trigger`."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            raw = getattr(self, f.name)
            try:
                value = _coerce(_hints(type(self))[f.name], raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"poison.trigger.{f.name}={raw!r}: {exc}") from None
            object.__setattr__(self, f.name, value)

    def check(self, channels: int, height: int, width: int) -> None:
        """Raise a one-line ConfigError for a value that does not fit an image of this size."""

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]) -> Any:
        """The trigger function object (``.apply(x, which)``) for one data set's shape and normalisation."""
        raise NotImplementedError


@dataclass(frozen=True)
class AttackKind:
    """One registered trigger kind: its settings class and what callers need to know about the attack."""

    name: str
    fields: type[TriggerFields]
    clean_label: bool = False  # only target-class samples are poisoned, and they keep their label
    noise_mode: bool = False  # the plan also holds samples that get a random variant of the trigger (label kept)
    surrogate: bool = False  # poisoned images are first perturbed with a clean model's gradients
    title: str = ""  # the attack in plain words, for reports


KINDS: dict[str, AttackKind] = {}


def trigger_kind(name: str, **capabilities: Any) -> Callable[[type[TriggerFields]], type[TriggerFields]]:
    """Register a settings class as the kind ``name`` (``poison.trigger.kind=name``) with its capabilities."""

    def deco(cls: type[TriggerFields]) -> type[TriggerFields]:
        if name in KINDS:
            raise ValueError(f"trigger kind {name!r} registered twice")
        KINDS[name] = AttackKind(name, cls, **capabilities)
        return cls

    return deco


def kind_of(name: str) -> AttackKind:
    """The registered kind (callers check the name first with :func:`potion.data.poison.validate_trigger`)."""
    return KINDS[name]


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        return _coerce(next(t for t in typing.get_args(tp) if t is not type(None)), value)
    if origin is list:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # one value for a list of them (a colour for every channel)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            return value  # left for the type check's message
        return tuple(_coerce(typing.get_args(tp)[0], v) for v in value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ValueError("must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        return float(value)
    return value
