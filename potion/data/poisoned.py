"""A data set together with its poison plan: the training set exactly as the attacker left it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from potion.core.errors import ConfigError
from potion.core.io import sha256_json, sha256_tensors
from potion.data.augment import Normalizer
from potion.data.poison import PoisonPlan, Trigger, TriggerSpec, make_poison_plan
from potion.data.sources import DatasetBundle, load_dataset
from potion.data.triggers import kind_of


@dataclass
class PoisonedData:
    """Clean test split + poisoned training split (labels flipped to the target, trigger flags set)."""

    bundle: DatasetBundle
    plan: PoisonPlan
    trigger: Trigger
    normalizer: Normalizer
    train_labels: torch.Tensor  # poisoned labels
    train_flags: torch.Tensor  # what the trigger gets: True where pasted (uint8 codes for a noise mode)

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def channels(self) -> int:
        return self.bundle.channels

    @property
    def poison_mask(self) -> torch.Tensor:
        """Bool mask over the training set: True at the plan's poisoned samples (noise-mode ones are not poison)."""
        return self.plan.mask()

    def wanted_test_labels(self) -> torch.Tensor:
        """The attacker's label for every test image (what asr counts)."""
        return self.plan.wanted(self.bundle.test.labels)


def load_data(dataset_cfg: Mapping[str, Any]) -> DatasetBundle:
    """Load (or fetch from the content-addressed cache) the configured data set; ``train_size``: a seeded,
    class-balanced subset of its training split (``subset_seed``), the test split whole."""
    d = {k: dataset_cfg.get(k) for k in dataset_cfg}  # a missing (???) value reads as None, not a traceback
    bundle = load_dataset(
        str(d.get("source", d.get("name"))), d.get("path"), download=bool(d.get("download", False)),
        mean=d.get("mean"), std=d.get("std"), image_size=d.get("image_size"), archive_limits=d,
    )
    size = d.get("train_size")
    return bundle if size is None else train_subset(bundle, int(size), int(d.get("subset_seed") or 0))


def train_subset(bundle: DatasetBundle, size: int, seed: int) -> DatasetBundle:
    """``size`` training samples, each class in its share of the split (largest remainders first), drawn by one
    seeded permutation and kept in the split's order; the same size and seed always give the same samples."""
    labels = bundle.train.labels
    n = int(labels.numel())
    if size >= n:
        return bundle
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    counts = torch.bincount(labels, minlength=bundle.num_classes)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    for c in torch.argsort(exact - quota.double(), descending=True, stable=True)[:size - int(quota.sum())]:
        quota[c] += 1
    keep = torch.cat([order[labels[order] == c][:int(quota[c])] for c in range(bundle.num_classes)]).sort().values
    paths = None if bundle.train.paths is None else tuple(bundle.train.paths[i] for i in keep.tolist())
    train = replace(bundle.train, images=bundle.train.images[keep], labels=labels[keep], paths=paths)
    return replace(bundle, train=train, fingerprint=sha256_json([bundle.fingerprint, "train_size", size, seed])[:16])


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
        exclude_target=bool(p.get("exclude_target", False)), mapping=str(p.get("mapping") or "all_to_one"),
    )


def poison(bundle: DatasetBundle, plan: PoisonPlan, poison_images: torch.Tensor | None = None) -> PoisonedData:
    """Apply a plan to a data set (labels and trigger flags; pixels are triggered batch-wise later).

    ``poison_images`` (uint8 [n_p, C, H, W], aligned with ``plan.indices``) replace the poisoned training
    images before augmentation: the label-consistent attack's PGD-hardened images.
    """
    if plan.num_train != len(bundle.train):
        raise ConfigError(f"the poison plan was drawn for {plan.num_train} training samples, the data set has "
                          f"{len(bundle.train)}: use the data set the model was trained on")
    if plan.num_classes is not None and plan.num_classes != bundle.num_classes:
        raise ConfigError(f"the poison plan maps labels over {plan.num_classes} classes, the data set has "
                          f"{bundle.num_classes}: use the data set the model was trained on")
    if poison_images is not None:
        bundle = with_poison_images(bundle, plan, poison_images)
    elif kind_needs_images(plan):
        raise ConfigError(f"poison.trigger.kind={plan.trigger.kind}: the perturbed training images "
                          "(poison_images.safetensors of the training run) are missing")
    _, c, h, w = bundle.train.images.shape
    return PoisonedData(
        bundle=bundle, plan=plan, trigger=Trigger(plan.trigger, c, h, w, bundle.mean, bundle.std),
        normalizer=Normalizer(bundle.mean, bundle.std), train_labels=plan.poisoned_labels(bundle.train.labels),
        train_flags=plan.flags(),
    )


def kind_needs_images(plan: PoisonPlan) -> bool:
    """Whether the plan's attack perturbs its training images (they travel with the run)."""
    return plan.count > 0 and kind_of(plan.trigger.kind).surrogate


def with_poison_images(bundle: DatasetBundle, plan: PoisonPlan, images: torch.Tensor) -> DatasetBundle:
    """The bundle with the poisoned samples' images replaced (and a fingerprint that says so)."""
    expected = (plan.count, *bundle.train.images.shape[1:])
    if images.dtype != torch.uint8 or tuple(images.shape) != expected:
        raise ConfigError(f"poison images: expected uint8 {list(expected)}, got {images.dtype} {list(images.shape)}")
    new = bundle.train.images.clone()
    new[torch.tensor(plan.indices, dtype=torch.long)] = images
    train = replace(bundle.train, images=new)
    fp = sha256_json([bundle.fingerprint, sha256_tensors({"poison_images": images})])[:16]
    return replace(bundle, train=train, fingerprint=fp)
