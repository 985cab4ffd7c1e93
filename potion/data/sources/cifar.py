"""CIFAR-10/100 in torchvision's pickled format, read through an unpickler that can only rebuild numpy arrays, so a
crafted file cannot run code."""

from __future__ import annotations

import codecs
import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potion.core.errors import DataError
from potion.core.io import sha256_file
from potion.data.sources.bundle import Arrays, resize

_IMAGEFOLDER_HINT = "use dataset=imagefolder dataset.path=<folder or .tar.gz>"


@dataclass(frozen=True)
class Layout:
    """Where torchvision's CIFAR pickles keep what: file names, label and class-name keys."""

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


LAYOUTS = {
    "cifar10": Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), "batches.meta", "labels", "label_names", "CIFAR10"),
    "cifar100": Layout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels",
                       "fine_label_names", "CIFAR100"),
}


def content(source: str, root: Path, download: bool) -> dict[str, Any]:
    """What the decoded arrays depend on: every pickle's sha256 (fetched first when missing and allowed)."""
    layout = LAYOUTS[source]
    folder = _ensure_cifar(root, layout, download)
    return {name: sha256_file(folder / name) for name in layout.files}


def decode(source: str, root: Path, image_size: int | None) -> Arrays:
    """Both splits of the pickles under ``root`` as uint8 arrays."""
    layout = LAYOUTS[source]
    folder = _cifar_folder(root, layout)
    meta = _read_pickle(folder / layout.meta)
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"CIFAR meta file {folder / layout.meta} has no {layout.names_key!r} list")
    classes = [str(_text(n)) for n in names]
    arrays: Arrays = {"classes": np.array(classes, dtype=str)}
    for split, files in (("train", layout.train), ("test", layout.test)):
        images, labels = _read_cifar_batches([folder / f for f in files], layout.label_key, len(classes))
        arrays[f"{split}_images"] = resize(images, image_size)
        arrays[f"{split}_labels"] = labels
    return arrays


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


def _cifar_folder(root: Path, layout: Layout) -> Path:
    """``<root>/<folder>``, or ``root`` itself when it already is that folder."""
    nested = root / layout.folder
    if not nested.is_dir() and all((root / name).is_file() for name in layout.files):
        return root
    return nested


def _missing_cifar(folder: Path, layout: Layout) -> list[str]:
    return [name for name in layout.files if not (folder / name).is_file()]


def _ensure_cifar(root: Path, layout: Layout, download: bool) -> Path:
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


def _download_cifar(root: Path, layout: Layout) -> None:
    datasets = importlib.import_module("torchvision.datasets")
    try:
        getattr(datasets, layout.torchvision_class)(root=str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - network, disk and checksum failures all need the same advice
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(
            f"could not download {layout.title} into {root} ({type(exc).__name__}: {first}); "
            f"put {layout.folder} under {root} by hand, or {_IMAGEFOLDER_HINT}"
        ) from exc


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
