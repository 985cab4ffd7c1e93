"""The poison plan (which training samples carry the trigger, with which labels) and THE trigger function.

One function, :meth:`Trigger.apply`, pastes the trigger for training, forget sets and evaluation, on
normalised image batches (after augmentation and normalisation, so a patch's position is fixed). The
trigger kinds live one per module in ``potion/data/triggers`` (registry: ``KINDS``); this module
turns a config into a :class:`TriggerSpec`, checks it against an image size, and draws a :class:`PoisonPlan`.

How many samples are poisoned: ``poison.count``, or ``poison.fraction`` of the WHOLE training set, for
every attack. Clean-label attacks (sig, label_consistent) draw them from the target class only (they
keep their label), so the count cannot exceed the target class's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from potion.config.compose import check_node
from potion.core.errors import ConfigError
from potion.core.io import plain
from potion.data.triggers import KINDS, TriggerFields, kind_of
from potion.data.triggers.patch import patch_origin as _origin

# The fields every plan file has carried since the first release (the patch's and the blend's): written for every
# kind, at their defaults where the kind has no such setting, so that a plan's bytes (and the keys made from them)
# stay as they were; read back, they are dropped for a kind that does not declare them.
BASE_FIELDS = ("kind", "size", "position", "offset", "value", "color", "alpha", "pattern_seed")


@dataclass(frozen=True, init=False)
class TriggerSpec:
    """What the trigger looks like: its kind and the kind's settings (``TriggerSpec(kind="sig", delta=10)``; the
    settings, their defaults and ranges are declared in the kind's module, potion/data/triggers/<kind>.py).

    Settings read as attributes (``spec.delta``); resolved against a data set's shape by :class:`Trigger`. Pixel
    amounts of the image-wide kinds are on the 0-255 scale, as the papers give them.
    """

    kind: str
    settings: TriggerFields | None  # None: an unknown kind, refused by validate_trigger

    def __init__(self, kind: str = "patch", **values: Any) -> None:
        declared = KINDS.get(kind)
        if declared is not None:
            known = [f.name for f in fields(declared.fields)]
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ConfigError(f"poison.trigger.{unknown[0]}: not a setting of kind {kind}; known: {known}")
        object.__setattr__(self, "kind", str(kind))
        object.__setattr__(self, "settings", None if declared is None else declared.fields(**values))

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if name.startswith("__") or settings is None:
            raise AttributeError(name)
        return getattr(settings, name)

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> TriggerSpec:
        """Build from a mapping (the ``poison.trigger`` config group, a plan file's ``trigger``); absent keys and
        nulls of settings that are not nullable take the defaults."""
        d = dict(cfg)
        kind = str(d.pop("kind", "patch"))
        declared = KINDS.get(kind)
        if declared is not None:
            defaults = {f.name: f.default for f in fields(declared.fields)}
            d = {k: v for k, v in d.items() if not (k in BASE_FIELDS and k not in defaults)
                 and (v is not None or defaults.get(k, 0) is None)}
        return TriggerSpec(kind, **d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: the base fields, then the kind's own settings."""
        own = plain(asdict(self.settings)) if self.settings is not None else {}
        base = {**_BASE_DEFAULTS, **{k: v for k, v in own.items() if k in BASE_FIELDS}}
        return {"kind": self.kind, **{k: base[k] for k in BASE_FIELDS[1:]},
                **{k: v for k, v in own.items() if k not in BASE_FIELDS}}


_BASE_DEFAULTS = {k: v for name in ("patch", "blend") for k, v in plain(asdict(KINDS[name].fields())).items()}


class Trigger:
    """A trigger resolved for one data set: THE function that pastes it (``apply``), whatever its kind."""

    def __init__(self, spec: TriggerSpec, channels: int, height: int, width: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        validate_trigger(spec, channels, height, width)
        self.spec = spec
        self.kind = kind_of(spec.kind)
        self._impl = spec.settings.build(channels, height, width, mean, std)  # type: ignore[union-attr]

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Paste the trigger into normalised images ``x`` [B, C, H, W].

        ``which``: None = every row; a bool mask = rows where True; uint8 codes = 1 trigger, 2 noise mode.
        """
        return self._impl.apply(x, which)


def patch_origin(spec: TriggerSpec, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of a patch trigger."""
    return _origin(spec.size, spec.position, spec.offset, height, width)


def validate_trigger(spec: TriggerSpec, channels: int, height: int, width: int) -> None:
    """Raise one ConfigError line naming the bad value and what is allowed: the schema's rules for the kind's
    settings (types, ranges), then the kind's own for this image size."""
    if spec.settings is None:
        raise ConfigError(f"poison.trigger.kind={spec.kind}: unknown; choose one of {sorted(KINDS)}")
    check_node(type(spec.settings), plain(asdict(spec.settings)), "poison.trigger")
    spec.settings.check(channels, height, width)


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
    if trigger.kind not in KINDS:
        raise ConfigError(f"poison.trigger.kind={trigger.kind}: unknown; choose one of {sorted(KINDS)}")
    kind = kind_of(trigger.kind)
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
