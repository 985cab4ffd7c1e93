"""scikit-learn's embedded 8x8 digits: the data set that needs no download, split by a fixed seed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from potion.core.io import sha256_file
from potion.data.sources.bundle import Arrays, resize
from potion.data.sources.cache import hash_arrays

_DIGITS_VERSION = "sklearn-load_digits/v1/seed0-last20pct-per-class/x255div16"


def content() -> dict[str, Any]:
    """The digits' content key without importing scikit-learn (~1 s) on every cached load: its version and
    the bytes of the data file it ships; the decoded arrays are hashed only where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        data_file = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if data_file.is_file():
            return {"version": _DIGITS_VERSION, "scikit-learn": importlib.metadata.version("scikit-learn"),
                    "file_sha256": sha256_file(data_file)}
    images, target = _raw()
    return {"version": _DIGITS_VERSION, "sha256": hash_arrays(images, target)}


def _raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return images, np.asarray(digits.target, dtype=np.int64)


def _split(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (seed 0) permutation; the last 20 % of each class goes to test. Returns sorted indices."""
    perm = np.random.default_rng(0).permutation(len(target))
    train, test = [], []
    for c in np.unique(target):
        idx = perm[target[perm] == c]
        n_test = round(0.2 * len(idx))
        train.append(idx[: len(idx) - n_test])
        test.append(idx[len(idx) - n_test :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def decode(image_size: int | None) -> Arrays:
    images, target = _raw()
    images = resize(np.ascontiguousarray(images[:, None]), image_size)
    train, test = _split(target)
    return {
        "classes": np.array([str(i) for i in range(10)], dtype=str),
        "train_images": np.ascontiguousarray(images[train]),
        "train_labels": target[train],
        "test_images": np.ascontiguousarray(images[test]),
        "test_labels": target[test],
    }
