"""Image data sources, decoded once to uint8 arrays and cached by content.

Sources: CIFAR-10/100 in torchvision's pickled format, image folders (a directory or a tar archive
holding ``train/<class>/<image>`` and ``test/<class>/<image>``) and scikit-learn's embedded digits.
Every source becomes a :class:`DatasetBundle` of uint8 ``[N, C, H, W]`` tensors. The decoded arrays
are cached under ``cache_dir()/datasets/<fingerprint>.npz``; the fingerprint hashes the source's
bytes and options, so a changed file never reuses a stale cache. CIFAR pickles go through an
unpickler that can only rebuild numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import lzma
import math
import os
import pickle
import tarfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from potion.core.errors import ConfigError, DataError
from potion.core.io import atomic_write_bytes, cache_dir, sha256_file, sha256_json

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "digits", "imagefolder")
SPLITS = ("train", "test")
CACHE_FORMAT = 1
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_IMAGEFOLDER_HINT = "use dataset=imagefolder dataset.path=<folder or .tar.gz>"
_DIGITS_VERSION = "sklearn-load_digits/v1/seed0-last20pct-per-class/x255div16"


# --------------------------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------------------------- entry point


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

    ``source`` is one of :data:`SOURCES`; ``path`` is the CIFAR root, the image folder / archive, or
    ignored for digits. ``image_size`` resizes to a square size. ``mean``/``std`` default to the
    per-channel statistics of the training images, in [0, 1] pixel units. ``archive_limits`` (the
    dataset config's ``archive_max_*`` keys) caps what a tar archive may expand to (:class:`ArchiveLimits`).
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown dataset source {source!r}; valid sources: {', '.join(SOURCES)}")
    _check_image_size(image_size)
    limits = ArchiveLimits.from_config(archive_limits)
    root = _resolve_root(source, path)
    content = _content_key(source, root, download)
    key = sha256_json({"format": CACHE_FORMAT, "source": source, "image_size": image_size, "content": content})
    cache_file = cache_dir() / "datasets" / f"{key}.npz"
    arrays = _read_cache(cache_file) if use_cache else None
    if arrays is None:
        arrays = _decode(source, root, image_size, limits)
        _check_arrays(arrays)
        if use_cache:
            _write_cache(cache_file, arrays)
    return _bundle(source, arrays, key, mean, std)


def _check_image_size(image_size: Any) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"dataset.image_size must be a positive integer or null, got {image_size!r}")


def _resolve_root(source: str, path: str | os.PathLike[str] | None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    if source == "imagefolder":
        raise ConfigError("dataset.path is required for dataset=imagefolder (a folder or a .tar.gz archive)")
    return cache_dir() / "downloads"  # CIFAR's default download root; unused by digits


def _content_key(source: str, root: Path, download: bool) -> dict[str, Any]:
    """What the decoded arrays depend on, hashed cheaply enough to check on every load."""
    if source in _CIFAR:
        folder = _ensure_cifar(root, _CIFAR[source], download)
        return {name: sha256_file(folder / name) for name in _CIFAR[source].files}
    if source == "imagefolder":
        if _is_archive(root):
            return {"archive_sha256": sha256_file(root)}
        return {"folder_sha256": _hash_folder(_scan_folder(root)[0])}
    return _digits_content()


def _decode(source: str, root: Path, image_size: int | None, limits: ArchiveLimits) -> dict[str, np.ndarray]:
    """Decode a source into the cacheable arrays: {train,test}_{images,labels[,paths]} and classes."""
    if source in _CIFAR:
        layout = _CIFAR[source]
        return _decode_cifar(_cifar_folder(root, layout), layout, image_size)
    if source == "imagefolder":
        return _decode_imagefolder(root, image_size, limits)
    return _decode_digits(image_size)


# --------------------------------------------------------------------------------------------- bundle


def _bundle(
    source: str,
    arrays: dict[str, np.ndarray],
    key: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> DatasetBundle:
    train, test = _split(arrays, "train"), _split(arrays, "test")
    channels = int(train.images.shape[1])
    mean_t = _normalisation(mean, "mean", channels) if mean is not None else None
    std_t = _normalisation(std, "std", channels) if std is not None else None
    if mean_t is None or std_t is None:
        data_mean, data_std = _channel_stats(arrays["train_images"])
        mean_t, std_t = mean_t or data_mean, std_t or data_std
    classes = tuple(str(c) for c in arrays["classes"])
    return DatasetBundle(source, train, test, classes, mean_t, std_t, key)


def _split(arrays: dict[str, np.ndarray], split: str) -> ImageSplit:
    images = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_images"]))
    labels = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_labels"], dtype=np.int64))
    paths = arrays.get(f"{split}_paths")
    return ImageSplit(images, labels, None if paths is None else tuple(str(p) for p in paths))


def _channel_stats(images: np.ndarray, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _normalisation(values: Sequence[float], name: str, channels: int) -> tuple[float, ...]:
    """Validate a user-given mean or std: one finite number per channel, std strictly positive."""
    if isinstance(values, (str, bytes)):
        raise ConfigError(f"dataset.{name} must be a list of numbers, got {values!r}")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"dataset.{name} must be a list of numbers, got {values!r}") from exc
    if len(out) != channels:
        raise ConfigError(f"dataset.{name} has {len(out)} values but the images have {channels} channel(s)")
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"dataset.{name} must be finite, got {list(out)}")
    if name == "std" and any(v <= 0 for v in out):
        raise ConfigError(f"dataset.std must be > 0 for every channel, got {list(out)}")
    return out


# --------------------------------------------------------------------------------------------- cache


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the arrays form a consistent pair of splits (guards against a bad cache)."""
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


DIGEST = "content_sha256"  # the cache entry's own field: sha256 of every other array, names included


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(f"{name}\0".encode())
        h.update(_hash_arrays(arrays[name]).encode())
    return h.hexdigest()


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
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
        _check_arrays(arrays)
    except Exception as exc:  # noqa: BLE001 - any defect means the same thing: rebuild
        log.warning(
            "dataset cache %s is unreadable (%s: %s); deleting and rebuilding it", path, type(exc).__name__, exc
        )
        path.unlink(missing_ok=True)
        return None
    log.info("dataset read from cache %s", path)
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Store the decoded arrays atomically; a read-only cache only costs a re-decode next time."""
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{DIGEST: np.array(_arrays_digest(arrays))})
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        log.warning("could not write dataset cache %s (%s); continuing without it", path, exc)


def _hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _resize(images: np.ndarray, size: int | None, chunk: int = 1024) -> np.ndarray:
    """Bilinear resize of uint8 NCHW arrays to a square size, in float and rounded back to uint8."""
    if size is None or images.shape[2:] == (size, size):
        return images
    out = np.empty((*images.shape[:2], size, size), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start : start + chunk]).float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out[start : start + chunk] = y.round().clamp_(0, 255).to(torch.uint8).numpy()
    return out


# --------------------------------------------------------------------------------------------- CIFAR pickles


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10",
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
        "CIFAR100",
    ),
}


def _array_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy array/dtype/scalar rebuilders and bytes decoding."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # Python 3 bytes under pickle protocol 2
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # pickle protocol 5
    return allowed


_ALLOWED_GLOBALS = _array_globals()


class _RefusedGlobal(Exception):
    """A pickle named a global outside the allow-list."""


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers only, so a crafted file cannot call anything."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _read_pickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR pickle as a dict with text keys; every failure is one DataError line."""
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"refused to load {path}: it references {exc}, which is not array data (CIFAR files hold only arrays, "
            "lists and strings); replace it with the original file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(
            f"corrupt or truncated CIFAR file {path} ({type(exc).__name__}); delete it and fetch it again"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"unexpected content in CIFAR file {path}: a {type(obj).__name__}, not a dict")
    return {_text(k): v for k, v in obj.items()}


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _cifar_folder(root: Path, layout: _CifarLayout) -> Path:
    """``<root>/<folder>``, or ``root`` itself when it already is that folder."""
    nested = root / layout.folder
    if not nested.is_dir() and all((root / name).is_file() for name in layout.files):
        return root
    return nested


def _missing_cifar(folder: Path, layout: _CifarLayout) -> list[str]:
    return [name for name in layout.files if not (folder / name).is_file()]


def _ensure_cifar(root: Path, layout: _CifarLayout, download: bool) -> Path:
    """Find the pickles (downloading them if allowed) or say where they were expected and how to fix it."""
    folder = _cifar_folder(root, layout)
    missing = _missing_cifar(folder, layout)
    if missing and download:
        _download_cifar(root, layout)
        folder = _cifar_folder(root, layout)
        missing = _missing_cifar(folder, layout)
    if missing:
        raise DataError(
            f"{layout.title} not found: {folder} lacks {', '.join(missing)}; put {layout.folder} under {root}, "
            f"set dataset.download=true when online, or {_IMAGEFOLDER_HINT}"
        )
    return folder


def _download_cifar(root: Path, layout: _CifarLayout) -> None:
    import importlib

    datasets = importlib.import_module("torchvision.datasets")
    try:
        getattr(datasets, layout.torchvision_class)(root=str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - network, disk and checksum failures all need the same advice
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(
            f"could not download {layout.title} into {root} ({type(exc).__name__}: {first}); "
            f"put {layout.folder} under {root} by hand, or {_IMAGEFOLDER_HINT}"
        ) from exc


def _decode_cifar(folder: Path, layout: _CifarLayout, image_size: int | None) -> dict[str, np.ndarray]:
    meta = _read_pickle(folder / layout.meta)
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"CIFAR meta file {folder / layout.meta} has no {layout.names_key!r} list")
    classes = [str(_text(n)) for n in names]
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=str)}
    for split, files in (("train", layout.train), ("test", layout.test)):
        images, labels = _read_cifar_batches([folder / f for f in files], layout.label_key, len(classes))
        arrays[f"{split}_images"] = _resize(images, image_size)
        arrays[f"{split}_labels"] = labels
    return arrays


def _read_cifar_batches(files: list[Path], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in files:
        batch = _read_pickle(path)
        data, y = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"CIFAR file {path} has no uint8 'data' array of shape [N, 3072]")
        try:
            y_arr = np.asarray(y, dtype=np.int64)
        except (TypeError, ValueError):
            y_arr = np.empty(0, dtype=np.int64)
        if y_arr.shape != (len(data),) or (len(y_arr) and (y_arr.min() < 0 or y_arr.max() >= num_classes)):
            raise DataError(f"CIFAR file {path} has no valid {label_key!r} list for its {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y_arr)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# --------------------------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class _Item:
    split: str
    cls: str
    rel: str  # "train/<class>/<file>", relative to the data root
    source: Path | bytes  # a file on disk, or the bytes of an archive member


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _decode_imagefolder(root: Path, image_size: int | None, limits: ArchiveLimits | None = None
                        ) -> dict[str, np.ndarray]:
    items, class_dirs = _scan_archive(root, limits) if _is_archive(root) else _scan_folder(root)
    classes = _check_layout(items, class_dirs, root)
    index = {c: i for i, c in enumerate(classes)}
    items = sorted(items, key=lambda it: (index[it.cls], it.rel))
    grayscale, size = _image_format(items, image_size, root)
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=str)}
    for split in SPLITS:
        part = [it for it in items if it.split == split]
        arrays[f"{split}_images"] = _decode_images(part, grayscale, size)
        arrays[f"{split}_labels"] = np.array([index[it.cls] for it in part], dtype=np.int64)
        arrays[f"{split}_paths"] = np.array([it.rel for it in part], dtype=str)
    return arrays


def folder_data_root(root: Path) -> Path:
    """The folder the image paths (``train/<class>/<file>``) are relative to: ``root`` or its wrapper subfolder."""
    return _folder_data_root(Path(root))


def _folder_data_root(root: Path) -> Path:
    """``root`` itself, or its single subfolder when that one holds train/ and test/."""
    if any((root / s).is_dir() for s in SPLITS):
        return root
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
        return subdirs[0]
    return root


def _scan_folder(root: Path) -> tuple[list[_Item], dict[str, set[str]]]:
    """Image files under ``<data root>/<split>/<class>/`` (recursively), and the class folders seen."""
    if not root.is_dir():
        what = "is not a folder or a .tar.gz/.tgz/.tar archive" if root.exists() else "not found"
        raise DataError(
            f"image folder {root} {what}; set dataset.path to a folder or archive holding "
            "train/<class>/<image> and test/<class>/<image>"
        )
    data_root = _folder_data_root(root)
    items: list[_Item] = []
    class_dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
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
                    if _is_image_name(name):
                        file = Path(dirpath) / name
                        items.append(_Item(split, cls_dir.name, file.relative_to(data_root).as_posix(), file))
    return items, class_dirs


def _hash_folder(items: list[_Item]) -> str:
    """sha256 over the sorted (relative path, file sha256) of every image the folder contributes."""
    h = hashlib.sha256()
    for item in sorted(items, key=lambda it: it.rel):
        h.update(f"{item.rel}\0{sha256_file(item.source)}\n".encode())
    return h.hexdigest()


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """Path components of an archive member, or None for absolute, parent-relative or hidden names."""
    if name.startswith(("/", "\\")):
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if not parts or any(p == ".." or p.startswith(".") for p in parts):
        return None
    return parts


def _archive_prefix(paths: list[tuple[str, ...]]) -> int:
    """How many leading components to drop: 0, or 1 when one top folder wraps train/ and test/."""
    if any(p[0] in SPLITS for p in paths):
        return 0
    tops = {p[0] for p in paths if len(p) > 1}
    if len(tops) == 1 and any(len(p) > 2 and p[1] in SPLITS for p in paths):
        return 1
    return 0


@dataclass(frozen=True)
class ArchiveLimits:
    """What reading a tar archive may cost: a crafted archive (a member declaring terabytes, a gzip bomb,
    millions of empty members) is refused in one line before it fills the memory.

    Members are streamed (decompressed in chunks, never extracted to disk); only image members are kept,
    as compressed bytes, so the whole archive's expanded size bounds the memory they take.
    """

    max_member_mb: float = 256.0  # one member (image or not) expanded, in MiB
    max_total_gb: float = 16.0  # the whole archive expanded (tar headers and skipped members included), in GiB
    max_members: int = 5_000_000

    KEYS = {"archive_max_member_mb": "max_member_mb", "archive_max_total_gb": "max_total_gb",
            "archive_max_members": "max_members"}

    @staticmethod
    def from_config(cfg: Mapping[str, Any] | None) -> ArchiveLimits:
        """From the dataset config's ``archive_max_*`` keys (missing or null: the default); bad values: ConfigError."""
        values: dict[str, Any] = {}
        for key, field_name in ArchiveLimits.KEYS.items():
            value = (cfg or {}).get(key)
            if value is None:
                continue
            integer = field_name == "max_members"
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if not ok or isinstance(value, bool) or not math.isfinite(float(value)) or value <= 0:
                kind = "a positive integer" if integer else "a positive number"
                raise ConfigError(f"dataset.{key}={value!r}: must be {kind}")
            values[field_name] = value
        return ArchiveLimits(**values)

    @property
    def member_bytes(self) -> int:
        return int(self.max_member_mb * (1 << 20))

    @property
    def total_bytes(self) -> int:
        return int(self.max_total_gb * (1 << 30))


class _ArchiveTooLarge(Exception):
    """The archive expands beyond its limits (the message says which and how to raise it)."""


class _BudgetedStream:
    """The decompressed bytes of an archive, read through a budget.

    The whole stream may not exceed ``total_bytes``; between two members the tar reader may not read more
    than the member it just skipped plus ``member_bytes`` (which bounds what an oversized tar header,
    e.g. a pax record, can make it hold in memory).
    """

    def __init__(self, raw: Any, limits: ArchiveLimits, path: Path) -> None:
        self.raw, self.limits, self.path = raw, limits, path
        self.count = 0
        self.allowed = limits.member_bytes + (1 << 20)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else 1 << 20)
        self.count += len(data)
        if self.count > self.limits.total_bytes:
            raise _ArchiveTooLarge(f"archive {self.path} expands to more than {self.limits.max_total_gb:g} GiB "
                                   f"(dataset.archive_max_total_gb={self.limits.max_total_gb:g})")
        if self.count > self.allowed:
            raise _ArchiveTooLarge(f"archive {self.path} holds a tar header larger than "
                                   f"{self.limits.max_member_mb:g} MiB (dataset.archive_max_member_mb)")
        return data

    def member(self, size: int) -> None:
        """A member was handed over: its data (read or skipped) and the next header may be read."""
        self.allowed = self.count + size + self.limits.member_bytes + (1 << 20)


def _open_decompressed(fh: Any) -> Any:
    """A reader of the tar bytes: gzip, bzip2 and xz are decompressed in chunks as they are read."""
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(fh, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fh, mode="rb")
    return fh


def _scan_archive(path: Path, limits: ArchiveLimits | None = None) -> tuple[list[_Item], dict[str, set[str]]]:
    """Image members of a tar archive, streamed into memory within ``limits`` (nothing is extracted to disk)."""
    limits = limits or ArchiveLimits()
    files: dict[tuple[str, ...], bytes] = {}
    dirs: list[tuple[str, ...]] = []
    try:
        with open(path, "rb") as raw, _open_decompressed(raw) as fh:
            stream = _BudgetedStream(fh, limits, path)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for n, member in enumerate(tar, start=1):
                    _check_member(member, n, limits, path)
                    stream.member(member.size)
                    _keep_member(tar, member, files, dirs)
    except _ArchiveTooLarge as exc:
        raise DataError(f"{exc}; refused to read it (raise the limit in the dataset config if the archive is "
                        "trusted)") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"cannot read archive {path}: corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return _archive_items(files, dirs)


def _check_member(member: tarfile.TarInfo, n: int, limits: ArchiveLimits, path: Path) -> None:
    if n > limits.max_members:
        raise _ArchiveTooLarge(f"archive {path} holds more than {limits.max_members} members "
                               f"(dataset.archive_max_members={limits.max_members})")
    if member.size > limits.member_bytes:
        raise _ArchiveTooLarge(f"member {member.name[:200]!r} of archive {path} expands to "
                               f"{member.size / (1 << 20):,.0f} MiB, more than dataset.archive_max_member_mb="
                               f"{limits.max_member_mb:g}")


def _keep_member(tar: tarfile.TarFile, member: tarfile.TarInfo, files: dict[tuple[str, ...], bytes],
                 dirs: list[tuple[str, ...]]) -> None:
    """Remember a safe folder name, or read a safe image member's bytes (others are skipped unread)."""
    parts = _safe_parts(member.name)
    if parts is None:
        return
    if member.isdir():
        dirs.append(parts)
    elif member.isfile() and _is_image_name(parts[-1]):
        fh = tar.extractfile(member)
        if fh is not None:
            files[parts] = fh.read(member.size)


def _archive_items(files: dict[tuple[str, ...], bytes], dirs: list[tuple[str, ...]]
                   ) -> tuple[list[_Item], dict[str, set[str]]]:
    drop = _archive_prefix(list(files))
    items: list[_Item] = []
    class_dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
    for full in dirs:
        parts = full[drop:]
        if len(parts) == 2 and parts[0] in SPLITS:
            class_dirs[parts[0]].add(parts[1])
    for full, data in files.items():
        parts = full[drop:]
        if len(parts) >= 3 and parts[0] in SPLITS:
            class_dirs[parts[0]].add(parts[1])
            items.append(_Item(parts[0], parts[1], "/".join(parts), data))
    return items, class_dirs


def _check_layout(items: list[_Item], class_dirs: dict[str, set[str]], where: Path) -> tuple[str, ...]:
    """Both splits present, same class set, no empty class: returns the sorted class names."""
    layout = "train/<class>/<image> and test/<class>/<image> (png, jpg, ...)"
    if not items:
        raise DataError(f"no images found in {where}: expected {layout}")
    counts = Counter((it.split, it.cls) for it in items)
    for split in SPLITS:
        if not any(s == split for s, _ in counts):
            raise DataError(f"no {split} images in {where}: expected {layout}")
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
                        f"more classes, one folder each: {layout}")
    return tuple(sorted(train))


def _open_image(item: _Item) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(item.source) if isinstance(item.source, bytes) else item.source)


def _image_format(items: list[_Item], image_size: int | None, where: Path) -> tuple[bool, tuple[int, int]]:
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


def _decode_images(items: list[_Item], grayscale: bool, size: tuple[int, int]) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------- digits


def _digits_content() -> dict[str, Any]:
    """The digits' content key without importing scikit-learn (~1 s) on every cached load: its version and
    the bytes of the data file it ships; the decoded arrays are hashed only where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        data_file = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if data_file.is_file():
            return {"version": _DIGITS_VERSION, "scikit-learn": importlib.metadata.version("scikit-learn"),
                    "file_sha256": sha256_file(data_file)}
    images, target = _digits_raw()
    return {"version": _DIGITS_VERSION, "sha256": _hash_arrays(images, target)}


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return images, np.asarray(digits.target, dtype=np.int64)


def _digits_split(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (seed 0) permutation; the last 20 % of each class goes to test. Returns sorted indices."""
    perm = np.random.default_rng(0).permutation(len(target))
    train, test = [], []
    for c in np.unique(target):
        idx = perm[target[perm] == c]
        n_test = round(0.2 * len(idx))
        train.append(idx[: len(idx) - n_test])
        test.append(idx[len(idx) - n_test :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _decode_digits(image_size: int | None) -> dict[str, np.ndarray]:
    images, target = _digits_raw()
    images = _resize(np.ascontiguousarray(images[:, None]), image_size)
    train, test = _digits_split(target)
    return {
        "classes": np.array([str(i) for i in range(10)], dtype=str),
        "train_images": np.ascontiguousarray(images[train]),
        "train_labels": target[train],
        "test_images": np.ascontiguousarray(images[test]),
        "test_labels": target[test],
    }
