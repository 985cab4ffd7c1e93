"""A data set together with its poison plan: the training set exactly as the attacker left it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from potion.data.augment import Normalizer
from potion.data.poison import PoisonPlan, Trigger, TriggerSpec, make_poison_plan
from potion.data.sources import DatasetBundle, load_dataset
from potion.errors import ConfigError


@dataclass
class PoisonedData:
    """Clean test split + poisoned training split (labels flipped to the target, trigger flags set)."""

    bundle: DatasetBundle
    plan: PoisonPlan
    trigger: Trigger
    normalizer: Normalizer
    train_labels: torch.Tensor  # poisoned labels
    train_flags: torch.Tensor  # True where the trigger is pasted

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def channels(self) -> int:
        return self.bundle.channels


def load_data(dataset_cfg: Mapping[str, Any]) -> DatasetBundle:
    """Load (or fetch from the content-addressed cache) the configured data set."""
    d = {k: dataset_cfg.get(k) for k in dataset_cfg}  # a missing (???) value reads as None, not a traceback
    return load_dataset(
        str(d.get("source", d.get("name"))), d.get("path"), download=bool(d.get("download", False)),
        mean=d.get("mean"), std=d.get("std"), image_size=d.get("image_size"),
    )


def plan_from_config(bundle: DatasetBundle, poison_cfg: Mapping[str, Any]) -> PoisonPlan:
    """Draw the poison plan the config asks for, validated against the data set."""
    p = dict(poison_cfg)
    spec = TriggerSpec.from_config(p.get("trigger", {}))
    _, c, h, w = bundle.train.images.shape
    Trigger(spec, c, h, w, bundle.mean, bundle.std)  # validates size/offset/colour against the image
    target = p.get("target", 0)
    if not isinstance(target, int) or not 0 <= target < bundle.num_classes:
        raise ConfigError(f"poison.target={target}: must be a class index in [0, {bundle.num_classes - 1}] "
                          f"({bundle.name} has {bundle.num_classes} classes)")
    return make_poison_plan(
        bundle.train.labels, target=target, num_classes=bundle.num_classes, trigger=spec,
        seed=int(p.get("seed", 0)), count=p.get("count"), fraction=p.get("fraction"),
        exclude_target=bool(p.get("exclude_target", False)),
    )


def poison(bundle: DatasetBundle, plan: PoisonPlan) -> PoisonedData:
    """Apply a plan to a data set (labels and trigger flags; pixels are triggered batch-wise later)."""
    if plan.num_train != len(bundle.train):
        raise ConfigError(f"the poison plan was drawn for {plan.num_train} training samples, the data set has "
                          f"{len(bundle.train)}: use the data set the model was trained on")
    _, c, h, w = bundle.train.images.shape
    return PoisonedData(
        bundle=bundle, plan=plan, trigger=Trigger(plan.trigger, c, h, w, bundle.mean, bundle.std),
        normalizer=Normalizer(bundle.mean, bundle.std), train_labels=plan.poisoned_labels(bundle.train.labels),
        train_flags=plan.mask(),
    )
