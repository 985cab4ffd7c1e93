"""Image data sources, decoded once to uint8 arrays and cached by content.

Sources: CIFAR-10/100 in torchvision's pickled format (:mod:`.cifar`), image folders, a directory or a tar archive
holding ``train/<class>/<image>`` and ``test/<class>/<image>`` (:mod:`.imagefolder`, :mod:`.archives`), and
scikit-learn's embedded digits (:mod:`.digits`). Every source becomes a :class:`DatasetBundle` of uint8
``[N, C, H, W]`` tensors (:mod:`.bundle`). The decoded arrays are cached under
``cache_dir()/datasets/<fingerprint>.npz`` (:mod:`.cache`); the fingerprint hashes the source's bytes and options,
so a changed file never reuses a stale cache.

The options come from a config the schema (:class:`potion.config.schema.Dataset`) has checked; what is checked
here needs the data (the channel count, the image sizes, the folder layout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from potion.core.io import cache_dir, sha256_json
from potion.data.sources import cifar, digits, imagefolder
from potion.data.sources.archives import ArchiveLimits
from potion.data.sources.bundle import Arrays, DatasetBundle, ImageSplit, make_bundle
from potion.data.sources.cache import check_arrays, read_cache, write_cache
from potion.data.sources.imagefolder import folder_data_root

__all__ = ["ArchiveLimits", "DatasetBundle", "ImageSplit", "folder_data_root", "load_dataset"]

CACHE_FORMAT = 1


def load_dataset(
    source: str,
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | None = None,
    use_cache: bool = True,
    archive_limits: Mapping[str, Any] | None = None,
) -> DatasetBundle:
    """Decode (or read from the cache) a data set and attach its normalisation.

    ``source`` is cifar10, cifar100, digits or imagefolder; ``path`` is the CIFAR root, the image folder / archive, or
    ignored for digits. ``image_size`` resizes to a square size. ``mean``/``std`` default to the
    per-channel statistics of the training images, in [0, 1] pixel units. ``archive_limits`` (the
    dataset config's ``archive_max_*`` keys) caps what a tar archive may expand to (:class:`ArchiveLimits`).
    """
    root = Path(path).expanduser() if path is not None else cache_dir() / "downloads"  # CIFAR's download root
    content = _content_key(source, root, download)
    key = sha256_json({"format": CACHE_FORMAT, "source": source, "image_size": image_size, "content": content})
    cache_file = cache_dir() / "datasets" / f"{key}.npz"
    arrays = read_cache(cache_file) if use_cache else None
    if arrays is None:
        arrays = _decode(source, root, image_size, ArchiveLimits.from_config(archive_limits))
        check_arrays(arrays)
        if use_cache:
            write_cache(cache_file, arrays)
    return make_bundle(source, arrays, key, mean, std)


def _content_key(source: str, root: Path, download: bool) -> dict[str, Any]:
    """What the decoded arrays depend on, hashed cheaply enough to check on every load."""
    if source == "imagefolder":
        return imagefolder.content(root)
    if source == "digits":
        return digits.content()
    return cifar.content(source, root, download)


def _decode(source: str, root: Path, image_size: int | None, limits: ArchiveLimits) -> Arrays:
    """Decode a source into the cacheable arrays: {train,test}_{images,labels[,paths]} and classes."""
    if source == "imagefolder":
        return imagefolder.decode(root, image_size, limits)
    if source == "digits":
        return digits.decode(image_size)
    return cifar.decode(source, root, image_size)
