"""Content-addressed, atomic cache of importances, logits and trigger syntheses: keyed by everything they depend on.

The key hashes the model's weights, the data set's fingerprint, the trigger and the exact sample
indices, and the estimator settings; two runs with different inputs never share an entry. Each entry
also stores the sha256 of its own tensors: an entry that is corrupt, lacks the digest or no longer
matches it (a file replaced by one of the same shape) is deleted and recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from potion.core.errors import CheckpointError
from potion.core.io import cache_dir, load_tensors, read_tensor_metadata, save_tensors, sha256_json, sha256_tensors

log = logging.getLogger("potion.cache")

DIGEST_KEY = "potion.sha256"  # safetensors header field: sha256_tensors of the entry's tensors


def indices_digest(idx: torch.Tensor) -> str:
    """sha256 of an index tensor's values (order matters: batches depend on it)."""
    return hashlib.sha256(idx.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def cached_tensors(path: Path, compute: Callable[[], dict[str, torch.Tensor]], enabled: bool = True
                   ) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, hit) from a content-addressed file: read a verified entry, or compute and write it atomically.

    A cache that cannot be written (full disk, read-only) costs a recomputation next time, nothing more.
    """
    if not enabled:
        return compute(), False
    if path.is_file():
        value = read_entry(path)
        if value is not None:
            return value, True
    value = compute()
    try:
        save_tensors(path, value, metadata={DIGEST_KEY: sha256_tensors(value)})
    except OSError as exc:
        log.warning("could not write cache entry %s (%s); going on without it", path, exc)
    return value, False


def read_entry(path: Path) -> dict[str, torch.Tensor] | None:
    """An entry's tensors if they match the digest stored with them; else the entry is deleted and None."""
    try:
        stored = read_tensor_metadata(path).get(DIGEST_KEY)
        value = load_tensors(path)
    except CheckpointError as exc:
        problem = str(exc)
    else:
        if stored is not None and stored == sha256_tensors(value):
            return value
        problem = "no content digest" if stored is None else "its tensors do not match its stored digest"
    log.warning("untrusted cache entry %s (%s); recomputing", path, problem)
    path.unlink(missing_ok=True)
    return None


def entry_path(kind: str, **parts: Any) -> Path:
    """Where an entry of ``kind`` (its folder in the cache) keyed by everything it depends on (``parts``) lives."""
    return cache_dir() / kind / f"{sha256_json({'kind': f'{kind}-v1', **parts})}.safetensors"

