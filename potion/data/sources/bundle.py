"""What every source decodes to: the arrays of two splits, and the :class:`DatasetBundle` with its normalisation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from potion.core.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
Arrays = dict[str, np.ndarray]  # {train,test}_{images,labels[,paths]} and classes: what the cache stores


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split: uint8 images [N, C, H, W] and int64 labels [N] (eq=False: tensors have no single truth value)."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: tuple[str, ...] | None = None  # image folders only: "train/<class>/<file>"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], got {tuple(self.labels.shape)}")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths for {len(self.labels)} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """A decoded data set with its normalisation and a content fingerprint (the cache key)."""

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height of the images; use ``train.images.shape`` for non-square data."""
        return int(self.train.images.shape[2])


def make_bundle(source: str, arrays: Arrays, key: str, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> DatasetBundle:
    """The bundle of decoded arrays; a mean or std not given is the training images' own."""
    train, test = _split(arrays, "train"), _split(arrays, "test")
    channels = int(train.images.shape[1])
    mean_t, std_t = _per_channel(mean, "mean", channels), _per_channel(std, "std", channels)
    if mean_t is None or std_t is None:
        data_mean, data_std = channel_stats(arrays["train_images"])
        mean_t, std_t = mean_t or data_mean, std_t or data_std
    classes = tuple(str(c) for c in arrays["classes"])
    return DatasetBundle(source, train, test, classes, mean_t, std_t, key)


def _split(arrays: Arrays, split: str) -> ImageSplit:
    images = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_images"]))
    labels = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_labels"], dtype=np.int64))
    paths = arrays.get(f"{split}_paths")
    return ImageSplit(images, labels, None if paths is None else tuple(str(p) for p in paths))


def _per_channel(values: Sequence[float] | None, name: str, channels: int) -> tuple[float, ...] | None:
    """A configured mean or std (numbers and range checked by the schema) against the images' channel count,
    which only the data knows."""
    if values is None:
        return None
    if len(values) != channels:
        raise ConfigError(f"dataset.{name} has {len(values)} values but the images have {channels} channel(s)")
    return tuple(float(v) for v in values)


def channel_stats(images: np.ndarray, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units, in chunks to bound float memory."""
    n, c, h, w = images.shape
    total, total_sq = np.zeros(c), np.zeros(c)
    for start in range(0, n, chunk):
        block = images[start : start + chunk].astype(np.float64)
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = n * h * w
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    if np.any(std == 0):
        log.warning("a channel of the training images is constant; using std 1.0 for it")
        std = np.where(std == 0, 255.0, std)
    return tuple(float(m) for m in mean / 255.0), tuple(float(s) for s in std / 255.0)


def resize(images: np.ndarray, size: int | None, chunk: int = 1024) -> np.ndarray:
    """Bilinear resize of uint8 NCHW arrays to a square size, in float and rounded back to uint8."""
    if size is None or images.shape[2:] == (size, size):
        return images
    out = np.empty((*images.shape[:2], size, size), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start : start + chunk]).float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out[start : start + chunk] = y.round().clamp_(0, 255).to(torch.uint8).numpy()
    return out
