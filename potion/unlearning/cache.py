"""Content-addressed, atomic cache of importances: keyed by everything they depend on.

The key hashes the model's weights, the data set's fingerprint, the trigger and the exact sample
indices, and the estimator settings; two runs with different inputs never share an entry, and a
corrupt entry is deleted and recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from potion.errors import CheckpointError
from potion.io import cache_dir, load_tensors, save_tensors, sha256_json

log = logging.getLogger("potion.cache")


def indices_digest(idx: torch.Tensor) -> str:
    """sha256 of an index tensor's values (order matters: batches depend on it)."""
    return hashlib.sha256(idx.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def importance_key(**parts: Any) -> str:
    """The cache key of one importance computation."""
    return sha256_json({"kind": "importance-v1", **parts})


def importance_path(key: str) -> Path:
    return cache_dir() / "importance" / f"{key}.safetensors"


def cached_importance(key: str, compute: Callable[[], dict[str, torch.Tensor]], enabled: bool = True
                      ) -> tuple[dict[str, torch.Tensor], bool]:
    """Return (importances, hit). Reads a finished entry or computes and writes it atomically."""
    return cached_tensors(importance_path(key), compute, enabled)


def cached_tensors(path: Path, compute: Callable[[], dict[str, torch.Tensor]], enabled: bool = True
                   ) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, hit) from a content-addressed file: read a finished entry, or compute and write it atomically."""
    if not enabled:
        return compute(), False
    if path.is_file():
        try:
            return load_tensors(path), True
        except CheckpointError as exc:
            log.warning("corrupt cache entry %s (%s); recomputing", path, exc)
            path.unlink(missing_ok=True)
    value = compute()
    save_tensors(path, value)
    return value, False


def logits_path(**parts: Any) -> Path:
    """Where the poisoned model's logits for one data split live (keyed by weights, data, trigger, device)."""
    return cache_dir() / "logits" / f"{sha256_json({'kind': 'logits-v1', **parts})}.safetensors"
