"""The content-addressed cache of decoded data sets: ``cache_dir()/datasets/<fingerprint>.npz``.

An entry stores a digest of its own arrays, so a damaged or replaced file is deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from potion.core.io import atomic_write_bytes
from potion.data.sources.bundle import SPLITS, Arrays

log = logging.getLogger(__name__)

DIGEST = "content_sha256"  # the cache entry's own field: sha256 of every other array, names included


def hash_arrays(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _arrays_digest(arrays: Arrays) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(f"{name}\0{hash_arrays(arrays[name])}".encode())
    return h.hexdigest()


def check_arrays(arrays: Arrays) -> None:
    """Raise ValueError unless the arrays form a consistent pair of splits (guards against a bad decode or cache)."""
    classes = arrays["classes"]
    if classes.ndim != 1 or classes.dtype.kind != "U" or len(classes) == 0:
        raise ValueError("classes must be a non-empty unicode array")
    shapes = set()
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
            raise ValueError(f"{split} images must be non-empty uint8 [N, C, H, W]")
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise ValueError(f"{split} labels must be int64 [N]")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise ValueError(f"{split} labels out of range")
        paths = arrays.get(f"{split}_paths")
        if paths is not None and (paths.dtype.kind != "U" or paths.shape != (len(images),)):
            raise ValueError(f"{split} paths must be a unicode array [N]")
        shapes.add(images.shape[1:])
    if len(shapes) != 1:
        raise ValueError(f"train and test image shapes differ: {sorted(shapes)}")


def read_cache(path: Path) -> Arrays | None:
    """Read a cached decode; a file that cannot be read, fails the checks or no longer matches the digest
    stored in it (e.g. replaced by arrays of the same shape) is deleted, never trusted."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:  # own the handle: closed on any error
            arrays = {name: npz[name] for name in npz.files}
        stored = arrays.pop(DIGEST, None)
        if stored is None or stored.shape != () or str(stored) != _arrays_digest(arrays):
            raise ValueError("no content digest" if stored is None else "the arrays do not match their digest")
        check_arrays(arrays)
    except Exception as exc:  # noqa: BLE001 - any defect means the same thing: rebuild
        log.warning(
            "dataset cache %s is unreadable (%s: %s); deleting and rebuilding it", path, type(exc).__name__, exc
        )
        path.unlink(missing_ok=True)
        return None
    log.info("dataset read from cache %s", path)
    return arrays


def write_cache(path: Path, arrays: Arrays) -> None:
    """Store the decoded arrays atomically; a read-only cache only costs a re-decode next time."""
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{DIGEST: np.array(_arrays_digest(arrays))})
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        log.warning("could not write dataset cache %s (%s); continuing without it", path, exc)
