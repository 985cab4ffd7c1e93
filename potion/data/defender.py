"""The training set as a defender holds it: images with any trigger already in their pixels, labels as given.

A defender of a poisoned model has files, not a poison plan: the poisoned samples look like every other
sample except for what the attacker painted into them, and carry whatever label the attacker gave them.
:class:`TrainingView` is exactly that and nothing more, so a method built on it cannot read the attack's
answer key (which samples are poison, their true labels, the target, the trigger function): the type has no
field that holds it. The benchmark makes its view by painting each poisoned sample's trigger into its stored
image once (``defender_view``), as the attacker's files would hold it (uint8, clipped); a practitioner's
view is their image folder as decoded (``view_of_bundle``). Evaluation keeps the plan; methods never get it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potion.core.io import sha256_json, sha256_tensors
from potion.data.augment import Normalizer
from potion.data.poisoned import PoisonedData
from potion.data.sources import DatasetBundle

CHUNK = 1024  # poisoned images painted per batch


@dataclass(frozen=True, eq=False)
class TrainingView:
    """uint8 training images [N, C, H, W] as stored (triggers in the pixels), labels as given, normalisation."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    normalizer: Normalizer
    fingerprint: str  # content of images + labels + normalisation: the cache key of everything computed on them
    paths: tuple[str, ...] | None = None  # the files behind the images (image folders), for suspect lists

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def normalised(self, idx: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Normalised float images of training indices ``idx`` (on ``device``)."""
        images = self.images[idx]
        return self.normalizer(images if device is None else images.to(device, non_blocking=True))


def make_view(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mean: tuple[float, ...],
              std: tuple[float, ...], paths: tuple[str, ...] | None = None) -> TrainingView:
    """A view over these images and labels, fingerprinted by their content."""
    fp = sha256_json([sha256_tensors({"images": images, "labels": labels}), list(mean), list(std)])[:16]
    return TrainingView(images, labels, int(num_classes), Normalizer(mean, std), fp, paths)


def view_of_bundle(bundle: DatasetBundle) -> TrainingView:
    """A practitioner's training set exactly as decoded from their files."""
    return make_view(bundle.train.images, bundle.train.labels, bundle.num_classes, bundle.mean, bundle.std,
                     bundle.train.paths)


def defender_view(data: PoisonedData) -> TrainingView:
    """The benchmark's poisoned training set as the attacker's files would hold it.

    Each sample the plan touches (its trigger, or an attack's noise mode) gets the trigger painted into its
    un-augmented image, which is then stored back as uint8 pixels; labels are the poisoned ones. Everything
    the plan knows beyond these pixels and labels stays with ``data``.
    """
    images = data.bundle.train.images.clone()
    touched = torch.nonzero(data.train_flags).view(-1)
    for i in range(0, int(touched.numel()), CHUNK):
        sel = touched[i:i + CHUNK]
        x = data.trigger.apply(data.normalizer(images[sel]), data.train_flags[sel])
        images[sel] = data.normalizer.to_uint8(x)
    return make_view(images, data.train_labels.clone(), data.num_classes, data.bundle.mean, data.bundle.std,
                     data.bundle.train.paths)
