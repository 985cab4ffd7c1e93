"""The poison plan (which training samples carry the trigger, with which labels) and THE trigger function.

One function, :meth:`Trigger.apply`, pastes the trigger for training, forget sets and evaluation, on
normalised image batches (after augmentation and normalisation, so a patch's position is fixed). The
trigger families live one per module in ``potion/data/triggers`` (registry: ``KINDS``); this module
turns a config into a validated :class:`TriggerSpec` and a :class:`PoisonPlan`.

How many samples are poisoned: ``poison.count``, or ``poison.fraction`` of the WHOLE training set, for
every attack. Clean-label attacks (sig, label_consistent) draw them from the target class only (they
keep their label), so the count cannot exceed the target class's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from potion.core.errors import ConfigError
from potion.data.triggers import KINDS, build_trigger, kind_of
from potion.data.triggers.additive import ftrojan_block_size
from potion.data.triggers.weighted import patch_origin as _origin

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")
TRIGGER_KINDS = tuple(KINDS)

# the fields every plan file has carried since the first release; the others are written only for their kind
BASE_FIELDS = ("kind", "size", "position", "offset", "value", "color", "alpha", "pattern_seed")
KIND_FIELDS = {
    "sig": ("delta", "frequency"),
    "wanet": ("grid_size", "strength", "warp_seed", "noise_ratio"),
    "ftrojan": ("magnitude", "frequencies", "block"),
    "label_consistent": ("amplitude", "eps", "pgd_steps", "pgd_step"),
}


@dataclass(frozen=True)
class TriggerSpec:
    """What the trigger looks like; resolved against a data set's shape and normalisation by :class:`Trigger`.

    Pixel amounts of the image-wide kinds (``delta``, ``magnitude``, ``amplitude``, ``eps``, ``pgd_step``)
    are on the 0-255 scale, as the papers give them.
    """

    kind: str = "patch"
    size: int = 3  # patch side (patch), corner checkerboard side (label_consistent)
    position: str = "bottom_right"
    offset: tuple[int, int] | None = None  # explicit (row, col) of the patch's top-left pixel
    value: float | None = None  # normalised value for every channel; None = the data set's max normalised value
    color: tuple[float, ...] | None = None  # pixel-space colour in [0, 1] (one value or one per channel)
    alpha: float = 0.1  # blend weight
    pattern_seed: int = 0  # blend pattern
    delta: float = 20.0  # sig: amplitude
    frequency: float = 6.0  # sig: periods across the image width
    grid_size: int = 4  # wanet: control grid k
    strength: float = 0.5  # wanet: warp strength s
    warp_seed: int = 0  # wanet: the random control grid
    noise_ratio: float = 2.0  # wanet: noise-mode samples per poisoned sample (0 = no noise mode)
    magnitude: float = 30.0  # ftrojan: added to each chosen DCT coefficient
    frequencies: tuple[tuple[int, int], ...] | None = None  # ftrojan: (u, v) pairs; None = mid and highest
    block: int = 32  # ftrojan: DCT block side (clipped to the image)
    amplitude: float = 64.0  # label_consistent: corner checkerboard amplitude
    eps: float = 8.0  # label_consistent: L-inf PGD budget
    pgd_steps: int = 10  # label_consistent: PGD iterations
    pgd_step: float = 2.0  # label_consistent: PGD step size

    @staticmethod
    def from_config(cfg: Any) -> TriggerSpec:
        """Build from a mapping (e.g. the ``poison.trigger`` config group); absent keys take the defaults."""
        d = {k: v for k, v in dict(cfg).items() if v is not None or k in ("offset", "value", "color", "frequencies")}
        known = {f.name: f for f in fields(TriggerSpec)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"poison.trigger.{unknown[0]}: unknown trigger setting; known: {sorted(known)}")
        out: dict[str, Any] = {}
        try:
            for key, raw in d.items():
                out[key] = _convert(key, raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"poison.trigger.{key}={raw!r}: {exc}") from None
        return TriggerSpec(**out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: the base fields plus those of this kind."""
        d = asdict(self)
        d["offset"] = None if self.offset is None else list(self.offset)
        d["color"] = None if self.color is None else list(self.color)
        d["frequencies"] = None if self.frequencies is None else [list(f) for f in self.frequencies]
        keep = BASE_FIELDS + KIND_FIELDS.get(self.kind, ())
        return {k: d[k] for k in keep}


def _convert(key: str, raw: Any) -> Any:
    """One config value to the spec's type (raises TypeError/ValueError with a short reason)."""
    if key in ("kind", "position"):
        return str(raw)
    if key in ("size", "pattern_seed", "grid_size", "warp_seed", "block", "pgd_steps"):
        if isinstance(raw, bool) or int(raw) != raw:
            raise ValueError("must be an integer")
        return int(raw)
    if key == "offset":
        return None if raw is None else (int(raw[0]), int(raw[1]))
    if key == "color":
        if raw is None:
            return None
        return tuple(float(c) for c in (raw if hasattr(raw, "__iter__") else [raw]))
    if key == "frequencies":
        return None if raw is None else tuple((int(f[0]), int(f[1])) for f in raw)
    if key == "value":
        return None if raw is None else float(raw)
    return float(raw)


class Trigger:
    """A trigger resolved for one data set: THE function that pastes it (``apply``), whatever its kind."""

    def __init__(self, spec: TriggerSpec, channels: int, height: int, width: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        validate_trigger(spec, channels, height, width)
        self.spec = spec
        self.kind = kind_of(spec.kind)
        self._impl = build_trigger(spec, channels, height, width, mean, std)

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Paste the trigger into normalised images ``x`` [B, C, H, W].

        ``which``: None = every row; a bool mask = rows where True; uint8 codes = 1 trigger, 2 noise mode.
        """
        return self._impl.apply(x, which)


def patch_origin(spec: TriggerSpec, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of a patch trigger."""
    return _origin(spec.size, spec.position, spec.offset, height, width)


def validate_trigger(spec: TriggerSpec, channels: int, height: int, width: int) -> None:
    """Raise ConfigError naming the bad value and what is allowed."""
    if spec.kind not in TRIGGER_KINDS:
        raise ConfigError(f"poison.trigger.kind={spec.kind}: unknown; choose one of {list(TRIGGER_KINDS)}")
    if spec.kind in ("patch", "label_consistent") and not 1 <= spec.size <= min(height, width) // (
            2 if spec.kind == "label_consistent" else 1):
        raise ConfigError(f"poison.trigger.size={spec.size}: must be between 1 and "
                          f"{min(height, width) // (2 if spec.kind == 'label_consistent' else 1)} for a "
                          f"{height}x{width} image")
    if spec.kind == "patch":
        _validate_patch(spec, channels, height, width)
    elif spec.kind == "blend" and not 0.0 < spec.alpha <= 1.0:
        raise ConfigError(f"poison.trigger.alpha={spec.alpha}: must be in (0, 1]")
    elif spec.kind == "sig":
        _positive(spec.delta, "delta", 255)
        _positive(spec.frequency, "frequency", width / 2)
    elif spec.kind == "wanet":
        if not 2 <= spec.grid_size <= min(height, width):
            raise ConfigError(f"poison.trigger.grid_size={spec.grid_size}: must be in [2, {min(height, width)}]")
        _positive(spec.strength, "strength", max(height, width))
        if not spec.noise_ratio >= 0:
            raise ConfigError(f"poison.trigger.noise_ratio={spec.noise_ratio}: must be >= 0 (0 = no noise mode)")
    elif spec.kind == "ftrojan":
        _positive(spec.magnitude, "magnitude", 255 * 8)
        block = ftrojan_block_size(spec, height, width)
        if block < 2:
            raise ConfigError(f"poison.trigger.block={spec.block}: must be >= 2")
        for u, v in spec.frequencies or ():
            if not (0 <= u < block and 0 <= v < block):
                raise ConfigError(f"poison.trigger.frequencies: ({u}, {v}) is outside the {block}x{block} DCT block "
                                  f"of this {height}x{width} image; use frequencies below {block}")
    elif spec.kind == "label_consistent":
        _positive(spec.amplitude, "amplitude", 255)
        _positive(spec.eps, "eps", 255)
        _positive(spec.pgd_step, "pgd_step", 255)
        if spec.pgd_steps < 0:
            raise ConfigError(f"poison.trigger.pgd_steps={spec.pgd_steps}: must be >= 0")


def _positive(value: float, name: str, hi: float) -> None:
    if not 0.0 < value <= hi:
        raise ConfigError(f"poison.trigger.{name}={value}: must be in (0, {hi:g}]")


def _validate_patch(spec: TriggerSpec, channels: int, height: int, width: int) -> None:
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


@dataclass(frozen=True)
class PoisonPlan:
    """Exactly which training samples are poisoned, with what trigger and labels; saved with every run.

    ``mapping``: all_to_one (poisoned label = ``target``) or all_to_all (label y -> (y + 1) mod C).
    Clean-label kinds keep the true label. ``noise_indices``: samples that get the trigger's noise mode
    (WaNet) and keep their label.
    """

    indices: tuple[int, ...]  # sorted training indices that carry the trigger
    true_labels: tuple[int, ...]  # their original labels, aligned with indices
    target: int
    trigger: TriggerSpec
    seed: int
    num_train: int
    exclude_target: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    mapping: str = "all_to_one"
    num_classes: int | None = None  # needed by all_to_all
    noise_indices: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def clean_label(self) -> bool:
        return kind_of(self.trigger.kind).clean_label

    @property
    def all_to_all(self) -> bool:
        return self.mapping == "all_to_all"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the on-disk form; fields at their defaults are left out, as older plans have them)."""
        d = {
            "indices": list(self.indices), "true_labels": list(self.true_labels), "target": self.target,
            "trigger": self.trigger.to_dict(), "seed": self.seed, "num_train": self.num_train,
            "exclude_target": self.exclude_target, "meta": dict(self.meta),
        }
        if self.mapping != "all_to_one":
            d["mapping"] = self.mapping
            d["num_classes"] = self.num_classes
        if self.noise_indices:
            d["noise_indices"] = list(self.noise_indices)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PoisonPlan:
        """Inverse of :meth:`to_dict`."""
        nc = d.get("num_classes")
        return PoisonPlan(
            indices=tuple(int(i) for i in d["indices"]), true_labels=tuple(int(i) for i in d["true_labels"]),
            target=int(d["target"]), trigger=TriggerSpec.from_config(d["trigger"]), seed=int(d["seed"]),
            num_train=int(d["num_train"]), exclude_target=bool(d.get("exclude_target", False)),
            meta=dict(d.get("meta", {})), mapping=str(d.get("mapping", "all_to_one")),
            num_classes=None if nc is None else int(nc),
            noise_indices=tuple(int(i) for i in d.get("noise_indices", ())),
        )

    def mask(self) -> torch.Tensor:
        """Bool mask over the training set, True where poisoned."""
        m = torch.zeros(self.num_train, dtype=torch.bool)
        m[list(self.indices)] = True
        return m

    def flags(self) -> torch.Tensor:
        """What the trigger function gets per training sample: the bool mask, or uint8 codes with a noise mode."""
        if not self.noise_indices:
            return self.mask()
        codes = torch.zeros(self.num_train, dtype=torch.uint8)
        codes[list(self.noise_indices)] = 2
        codes[list(self.indices)] = 1
        return codes

    def wanted(self, true_labels: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for triggered inputs of these true labels (what asr counts)."""
        if self.all_to_all:
            return (true_labels + 1) % int(self.num_classes)
        return torch.full_like(true_labels, self.target)

    def poisoned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Training labels as the poisoned set presents them (clean-label kinds leave them unchanged)."""
        out = labels.clone()
        if self.clean_label:
            return out
        idx = torch.tensor(self.indices, dtype=torch.long)
        out[idx] = self.wanted(labels[idx])
        return out


def resolve_poison_count(num_train: int, count: int | None, fraction: float | None) -> int:
    """n_p from ``poison.count`` or ``poison.fraction`` (exactly one, in range: the config schema), checked against
    the training-set size."""
    if count is None:
        return max(1, int(round(float(fraction) * num_train)))
    if count > num_train:
        raise ConfigError(f"poison.count={count}: larger than the training set ({num_train} samples)")
    return count


def make_poison_plan(labels: torch.Tensor, *, target: int, num_classes: int, trigger: TriggerSpec, seed: int,
                     count: int | None = None, fraction: float | None = None,
                     exclude_target: bool = False, mapping: str = "all_to_one") -> PoisonPlan:
    """Draw n_p training indices uniformly without replacement with a seeded generator (method.md §2).

    Clean-label kinds draw from the target class only; ``poison.fraction`` is still a share of the whole
    training set. WaNet's noise-mode samples are drawn (seed + 1) from the samples left unpoisoned.
    A plan with ``trigger.kind=none`` poisons nothing (the clean reference model).
    """
    if target >= num_classes:  # >= 0 and the mapping's name: the config schema; the classes: the data
        raise ConfigError(f"poison.target={target}: must be a class index in [0, {num_classes - 1}]")
    kind = kind_of(trigger.kind) if trigger.kind in KINDS else None
    if kind is None:
        raise ConfigError(f"poison.trigger.kind={trigger.kind}: unknown; choose one of {list(TRIGGER_KINDS)}")
    num_train = int(labels.numel())
    if kind.name == "none":
        return PoisonPlan(indices=(), true_labels=(), target=target, trigger=trigger, seed=int(seed),
                          num_train=num_train)
    if kind.clean_label and mapping == "all_to_all":
        raise ConfigError(f"poison.mapping=all_to_all: {trigger.kind} is a clean-label attack (poisoned samples keep "
                          "their label), so it has no label mapping; use poison.mapping=all_to_one")
    candidates = torch.arange(num_train)
    if kind.clean_label:
        candidates = candidates[labels == target]
        n_p = resolve_poison_count(num_train, count, fraction)
        if n_p > len(candidates):
            raise ConfigError(f"poison: {n_p} poisoned samples asked, but {trigger.kind} is a clean-label attack that "
                              f"can only poison the target class {target}, which has {len(candidates)} training "
                              "samples; lower poison.count / poison.fraction")
    else:
        if exclude_target:
            candidates = candidates[labels != target]
        n_p = resolve_poison_count(len(candidates), count, fraction)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n_p]]
    indices = torch.sort(chosen).values
    noise: tuple[int, ...] = ()
    if kind.noise_mode and trigger.noise_ratio > 0:
        rest = torch.ones(num_train, dtype=torch.bool)
        rest[indices] = False
        pool = torch.nonzero(rest).view(-1)
        n_noise = min(len(pool), int(round(trigger.noise_ratio * n_p)))
        pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed) + 1))[:n_noise]]
        noise = tuple(torch.sort(pick).values.tolist())
    return PoisonPlan(
        indices=tuple(indices.tolist()), true_labels=tuple(labels[indices].tolist()), target=target,
        trigger=trigger, seed=int(seed), num_train=num_train, exclude_target=exclude_target,
        mapping=mapping, num_classes=num_classes if mapping == "all_to_all" else None, noise_indices=noise,
    )
