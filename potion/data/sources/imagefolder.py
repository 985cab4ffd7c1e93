"""Image folders: ``train/<class>/<image>`` and ``test/<class>/<image>`` in a folder or a tar archive.

The layout and the image sizes are checked here: only the data can say whether they fit.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from potion.core.errors import DataError
from potion.core.io import sha256_file
from potion.data.sources.archives import ArchiveLimits, Item, Scan, is_archive, is_image_name, no_classes, scan_archive
from potion.data.sources.bundle import SPLITS, Arrays

LAYOUT = "train/<class>/<image> and test/<class>/<image> (png, jpg, ...)"


def content(root: Path) -> dict[str, Any]:
    """What the decoded arrays depend on: the archive's bytes, or every image file's path and bytes."""
    if is_archive(root):
        return {"archive_sha256": sha256_file(root)}
    h = hashlib.sha256()
    for item in sorted(_scan_folder(root)[0], key=lambda it: it.rel):
        h.update(f"{item.rel}\0{sha256_file(item.source)}\n".encode())  # type: ignore[arg-type]
    return {"folder_sha256": h.hexdigest()}


def decode(root: Path, image_size: int | None, limits: ArchiveLimits | None = None) -> Arrays:
    """Every image as uint8 arrays, classes sorted by name, images by class then path (``*_paths`` kept)."""
    items, class_dirs = scan_archive(root, limits) if is_archive(root) else _scan_folder(root)
    classes = _check_layout(items, class_dirs, root)
    index = {c: i for i, c in enumerate(classes)}
    items = sorted(items, key=lambda it: (index[it.cls], it.rel))
    grayscale, size = _image_format(items, image_size, root)
    arrays: Arrays = {"classes": np.array(classes, dtype=str)}
    for split in SPLITS:
        part = [it for it in items if it.split == split]
        arrays[f"{split}_images"] = _decode_images(part, grayscale, size)
        arrays[f"{split}_labels"] = np.array([index[it.cls] for it in part], dtype=np.int64)
        arrays[f"{split}_paths"] = np.array([it.rel for it in part], dtype=str)
    return arrays


def folder_data_root(root: Path) -> Path:
    """The folder the image paths (``train/<class>/<file>``) are relative to: ``root`` itself, or its single
    subfolder when that one holds train/ and test/."""
    root = Path(root)
    if any((root / s).is_dir() for s in SPLITS):
        return root
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
        return subdirs[0]
    return root


def _scan_folder(root: Path) -> Scan:
    """Image files under ``<data root>/<split>/<class>/`` (recursively), and the class folders seen."""
    if not root.is_dir():
        what = "is not a folder or a .tar.gz/.tgz/.tar archive" if root.exists() else "not found"
        raise DataError(f"image folder {root} {what}; set dataset.path to a folder or archive holding {LAYOUT}")
    data_root = folder_data_root(root)
    items: list[Item] = []
    class_dirs = no_classes()
    for split in SPLITS:
        split_dir = data_root / split
        if not split_dir.is_dir():
            continue
        for cls_dir in split_dir.iterdir():
            if not cls_dir.is_dir() or cls_dir.name.startswith("."):
                continue
            class_dirs[split].add(cls_dir.name)
            for dirpath, dirnames, filenames in os.walk(cls_dir):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if is_image_name(name):
                        file = Path(dirpath) / name
                        items.append(Item(split, cls_dir.name, file.relative_to(data_root).as_posix(), file))
    return items, class_dirs


def _check_layout(items: list[Item], class_dirs: dict[str, set[str]], where: Path) -> tuple[str, ...]:
    """Both splits present, same class set, no empty class: returns the sorted class names."""
    if not items:
        raise DataError(f"no images found in {where}: expected {LAYOUT}")
    counts = Counter((it.split, it.cls) for it in items)
    for split in SPLITS:
        if not any(s == split for s, _ in counts):
            raise DataError(f"no {split} images in {where}: expected {LAYOUT}")
    train, test = class_dirs["train"], class_dirs["test"]
    if train != test:
        raise DataError(
            f"train and test classes differ in {where}: only in train {sorted(train - test)}, "
            f"only in test {sorted(test - train)}"
        )
    empty = sorted(f"{s}/{c}" for s in SPLITS for c in class_dirs[s] if counts[(s, c)] == 0)
    if empty:
        raise DataError(f"class folders without images in {where}: {', '.join(empty[:5])}")
    if len(train) < 2:  # every prediction would be right: clean_acc 1.0, no attack measurable, nothing to heal
        raise DataError(f"only one class folder ({', '.join(sorted(train))}) in {where}: a classifier needs two or "
                        f"more classes, one folder each: {LAYOUT}")
    return tuple(sorted(train))


def _open_image(item: Item) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(item.source) if isinstance(item.source, bytes) else item.source)


def _image_format(items: list[Item], image_size: int | None, where: Path) -> tuple[bool, tuple[int, int]]:
    """Read headers only: (all grayscale?, output (width, height)); mixed sizes need image_size."""
    modes: set[str] = set()
    sizes: Counter[tuple[int, int]] = Counter()
    for item in items:
        try:
            with _open_image(item) as img:
                modes.add(img.mode)
                sizes[img.size] += 1
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            raise DataError(f"cannot decode image {item.rel} in {where} ({type(exc).__name__}: {exc})") from exc
    if image_size is not None:
        return modes <= {"L", "1"}, (image_size, image_size)
    if len(sizes) > 1:
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
        raise DataError(
            f"images in {where} have {len(sizes)} different sizes (e.g. {common}); "
            "set dataset.image_size=<pixels> to resize them all to one square size"
        )
    return modes <= {"L", "1"}, next(iter(sizes))


def _decode_images(items: list[Item], grayscale: bool, size: tuple[int, int]) -> np.ndarray:
    """Decode into one preallocated uint8 [N, C, H, W] array (plain loop: fast enough for 60k JPEGs)."""
    from PIL import Image

    mode = "L" if grayscale else "RGB"
    width, height = size
    out = np.empty((len(items), 1 if grayscale else 3, height, width), dtype=np.uint8)
    for i, item in enumerate(items):
        try:
            with _open_image(item) as img:
                pic = img if img.mode == mode else img.convert(mode)
                if pic.size != size:
                    pic = pic.resize(size, Image.Resampling.BILINEAR)
                pixels = np.asarray(pic)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            raise DataError(f"cannot decode image {item.rel} ({type(exc).__name__}: {exc})") from exc
        if grayscale:
            out[i, 0] = pixels
        else:
            out[i] = pixels.transpose(2, 0, 1)
    return out
