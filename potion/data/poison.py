"""The poison plan (which training samples carry the trigger) and THE trigger function.

One function, :func:`Trigger.apply`, pastes the trigger for training, forget sets and evaluation, on
normalised image batches (after augmentation and normalisation, so a patch's position is fixed).
Both trigger kinds are one formula, ``x + w * (p - x)``: a patch has weight 1 inside the patch and 0
elsewhere, a blend has weight ``alpha`` everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from potion.errors import ConfigError

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")
TRIGGER_KINDS = ("patch", "blend")


@dataclass(frozen=True)
class TriggerSpec:
    """What the trigger looks like; resolved against a data set's shape and normalisation by :class:`Trigger`."""

    kind: str = "patch"
    size: int = 3
    position: str = "bottom_right"
    offset: tuple[int, int] | None = None  # explicit (row, col) of the patch's top-left pixel
    value: float | None = None  # normalised value for every channel; None = the data set's max normalised value
    color: tuple[float, ...] | None = None  # pixel-space colour in [0, 1] (one value or one per channel)
    alpha: float = 0.1  # blend weight
    pattern_seed: int = 0  # blend pattern

    @staticmethod
    def from_config(cfg: Any) -> TriggerSpec:
        """Build from a mapping (e.g. the ``poison.trigger`` config group)."""
        d = dict(cfg)
        offset = d.get("offset")
        color = d.get("color")
        if color is not None and not isinstance(color, (list, tuple)) and not hasattr(color, "__iter__"):
            color = [color]
        return TriggerSpec(
            kind=str(d.get("kind", "patch")),
            size=int(d.get("size", 3)),
            position=str(d.get("position", "bottom_right")),
            offset=None if offset is None else (int(offset[0]), int(offset[1])),
            value=None if d.get("value") is None else float(d["value"]),
            color=None if color is None else tuple(float(c) for c in color),
            alpha=float(d.get("alpha", 0.1)),
            pattern_seed=int(d.get("pattern_seed", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["offset"] = None if self.offset is None else list(self.offset)
        d["color"] = None if self.color is None else list(self.color)
        return d


class Trigger:
    """A trigger resolved for one data set: a weight map ``w`` and a target pattern ``p`` in normalised units."""

    def __init__(self, spec: TriggerSpec, channels: int, height: int, width: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        validate_trigger(spec, channels, height, width)
        self.spec = spec
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        weight = torch.zeros(1, channels, height, width)
        if spec.kind == "patch":
            r, c = patch_origin(spec, height, width)
            weight[:, :, r:r + spec.size, c:c + spec.size] = 1.0
            if spec.color is not None:
                color = torch.tensor(spec.color, dtype=torch.float32)
                color = color.expand(channels) if color.numel() == 1 else color
                pattern = ((color.view(1, -1, 1, 1) - mean_t) / std_t).expand(1, channels, height, width)
            else:
                value = spec.value if spec.value is not None else float(((1.0 - mean_t) / std_t).max())
                pattern = torch.full((1, channels, height, width), value)
        else:
            weight.fill_(spec.alpha)
            gen = torch.Generator().manual_seed(spec.pattern_seed)
            pixels = torch.rand(1, channels, height, width, generator=gen)
            pattern = (pixels - mean_t) / std_t
        self.weight = weight.contiguous()
        self.pattern = pattern.contiguous()
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = (self.weight.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype))
        return self._cache[key]

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Paste the trigger into normalised images ``x`` [B, C, H, W]; only rows where ``which`` is True if given."""
        w, p = self._on(x)
        triggered = x + w * (p - x)
        if which is None:
            return triggered
        return torch.where(which.view(-1, 1, 1, 1).to(x.device), triggered, x)


def patch_origin(spec: TriggerSpec, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of a patch trigger."""
    if spec.offset is not None:
        return spec.offset
    s = spec.size
    return {
        "bottom_right": (height - s, width - s),
        "bottom_left": (height - s, 0),
        "top_right": (0, width - s),
        "top_left": (0, 0),
    }[spec.position]


def validate_trigger(spec: TriggerSpec, channels: int, height: int, width: int) -> None:
    """Raise ConfigError naming the bad value and what is allowed."""
    if spec.kind not in TRIGGER_KINDS:
        raise ConfigError(f"poison.trigger.kind={spec.kind}: unknown; choose one of {list(TRIGGER_KINDS)}")
    if spec.kind == "patch":
        if not 1 <= spec.size <= min(height, width):
            raise ConfigError(f"poison.trigger.size={spec.size}: must be between 1 and the image size "
                              f"{min(height, width)}")
        if spec.offset is None and spec.position not in CORNERS:
            raise ConfigError(f"poison.trigger.position={spec.position}: choose one of {list(CORNERS)} "
                              "or set poison.trigger.offset=[row,col]")
        if spec.offset is not None:
            r, c = spec.offset
            if not (0 <= r <= height - spec.size and 0 <= c <= width - spec.size):
                raise ConfigError(f"poison.trigger.offset={list(spec.offset)}: the {spec.size}x{spec.size} patch "
                                  f"must fit inside the {height}x{width} image")
        if spec.color is not None:
            if len(spec.color) not in (1, channels) or not all(0.0 <= c <= 1.0 for c in spec.color):
                raise ConfigError(f"poison.trigger.color={list(spec.color)}: give 1 or {channels} values in [0, 1]")
    elif not 0.0 < spec.alpha <= 1.0:
        raise ConfigError(f"poison.trigger.alpha={spec.alpha}: must be in (0, 1]")


@dataclass(frozen=True)
class PoisonPlan:
    """Exactly which training samples are poisoned, with what trigger and target; saved with every run."""

    indices: tuple[int, ...]  # sorted training indices that carry the trigger
    true_labels: tuple[int, ...]  # their original labels, aligned with indices
    target: int
    trigger: TriggerSpec
    seed: int
    num_train: int
    exclude_target: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the on-disk form)."""
        return {
            "indices": list(self.indices), "true_labels": list(self.true_labels), "target": self.target,
            "trigger": self.trigger.to_dict(), "seed": self.seed, "num_train": self.num_train,
            "exclude_target": self.exclude_target, "meta": dict(self.meta),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PoisonPlan:
        """Inverse of :meth:`to_dict`."""
        return PoisonPlan(
            indices=tuple(int(i) for i in d["indices"]), true_labels=tuple(int(i) for i in d["true_labels"]),
            target=int(d["target"]), trigger=TriggerSpec.from_config(d["trigger"]), seed=int(d["seed"]),
            num_train=int(d["num_train"]), exclude_target=bool(d.get("exclude_target", False)),
            meta=dict(d.get("meta", {})),
        )

    def mask(self) -> torch.Tensor:
        """Bool mask over the training set, True where poisoned."""
        m = torch.zeros(self.num_train, dtype=torch.bool)
        m[list(self.indices)] = True
        return m

    def poisoned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Training labels as the poisoned set presents them (target class at poisoned indices)."""
        out = labels.clone()
        out[list(self.indices)] = self.target
        return out


def resolve_poison_count(num_train: int, count: int | None, fraction: float | None) -> int:
    """n_p from ``poison.count`` or ``poison.fraction`` (exactly one), validated against the training-set size."""
    if (count is None) == (fraction is None):
        raise ConfigError("poison: set exactly one of poison.count (e.g. 500) or poison.fraction (e.g. 0.01)")
    if fraction is not None:
        if not 0.0 < float(fraction) < 1.0:
            raise ConfigError(f"poison.fraction={fraction}: must be in (0, 1), e.g. 0.01 for 1 %")
        return max(1, int(round(float(fraction) * num_train)))
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"poison.count={count}: must be a positive integer")
    if count > num_train:
        raise ConfigError(f"poison.count={count}: larger than the training set ({num_train} samples)")
    return count


def make_poison_plan(labels: torch.Tensor, *, target: int, num_classes: int, trigger: TriggerSpec, seed: int,
                     count: int | None = None, fraction: float | None = None,
                     exclude_target: bool = False) -> PoisonPlan:
    """Draw n_p training indices uniformly without replacement with a seeded generator (method.md §2)."""
    if not isinstance(target, int) or not 0 <= target < num_classes:
        raise ConfigError(f"poison.target={target}: must be a class index in [0, {num_classes - 1}]")
    num_train = int(labels.numel())
    candidates = torch.arange(num_train)
    if exclude_target:
        candidates = candidates[labels != target]
    n_p = resolve_poison_count(len(candidates), count, fraction)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n_p]]
    indices = torch.sort(chosen).values
    return PoisonPlan(
        indices=tuple(indices.tolist()), true_labels=tuple(labels[indices].tolist()), target=target,
        trigger=trigger, seed=int(seed), num_train=num_train, exclude_target=exclude_target,
    )
