"""Data sources: image folders and archives, CIFAR pickles (incl. a malicious one), digits and the cache."""

from __future__ import annotations

import logging
import pickle
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from potion.config.compose import check_node
from potion.config.schema import Dataset
from potion.core.errors import ConfigError, DataError
from potion.data import sources
from potion.data.sources import DatasetBundle, load_dataset
from potion.data.sources.cache import read_cache
from potion.data.sources.cifar import LAYOUTS

pytestmark = pytest.mark.usefixtures("cache")  # every test decodes into its own cache folder (tests/conftest.py)


def _write_folder(
    root: Path,
    classes: dict[str, tuple[int, int]],
    *,
    mode: str = "RGB",
    size: tuple[int, int] = (8, 8),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """PNG images at root/<split>/<class>/<i>.png; classes maps name -> (n_train, n_test). Returns rel -> HWC."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, counts in classes.items():
        for split, n in zip(("train", "test"), counts, strict=True):
            folder = root / split / cls
            if n:
                folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode=mode).save(folder / f"{i:03d}.png")
                written[f"{split}/{cls}/{i:03d}.png"] = pixels
    return written


def _tar(folder: Path, out: Path, top: str | None = None) -> Path:
    with tarfile.open(out, "w:gz" if out.name.endswith("gz") else "w") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"{top}/{split}" if top else split)
    return out


def _check_roundtrip(bundle: DatasetBundle, written: dict[str, np.ndarray], classes: list[str]) -> None:
    assert bundle.classes == tuple(classes)
    for split in (bundle.train, bundle.test):
        assert split.paths is not None and len(split.paths) == len(split)
        for image, label, rel in zip(split.images, split.labels, split.paths, strict=True):
            assert rel.split("/")[1] == classes[int(label)]
            expected = written[rel]
            expected = expected[None] if expected.ndim == 2 else expected.transpose(2, 0, 1)
            assert np.array_equal(image.numpy(), expected)


# ------------------------------------------------------------------------------ image folders


@pytest.mark.parametrize("form", ["folder", "tar", "tar-with-top", "folder-with-top"])
def test_imagefolder_roundtrip(tmp_path: Path, form: str) -> None:
    base = tmp_path / "data"
    data = base / "cifar10" if form.endswith("with-top") else base
    written = _write_folder(data, {"dog": (3, 1), "cat": (2, 2), "ant": (1, 1)})
    path = base
    if form.startswith("tar"):
        path = _tar(data, tmp_path / "pack.tar.gz", top="cifar10" if form == "tar-with-top" else None)
    bundle = load_dataset("imagefolder", str(path))
    assert bundle.train.images.shape == (6, 3, 8, 8) and bundle.test.images.shape == (4, 3, 8, 8)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.is_contiguous()
    assert bundle.train.labels.dtype == torch.int64
    assert bundle.num_classes == 3 and bundle.channels == 3 and bundle.image_size == 8
    assert bundle.train.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert bundle.train.paths[:3] == ("train/ant/000.png", "train/cat/000.png", "train/cat/001.png")
    _check_roundtrip(bundle, written, ["ant", "cat", "dog"])


def test_imagefolder_grayscale_is_one_channel(tmp_path: Path) -> None:
    written = _write_folder(tmp_path / "d", {"a": (2, 1), "b": (1, 1)}, mode="L")
    bundle = load_dataset("imagefolder", tmp_path / "d")
    assert bundle.channels == 1 and bundle.train.images.shape == (3, 1, 8, 8)
    assert len(bundle.mean) == 1 and len(bundle.std) == 1
    _check_roundtrip(bundle, written, ["a", "b"])


def test_imagefolder_mixed_colour_becomes_rgb(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (1, 1)}, mode="L")
    _write_folder(tmp_path / "d", {"b": (1, 1)}, mode="RGB")
    assert load_dataset("imagefolder", tmp_path / "d").channels == 3


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (1, 1), "b": (1, 0)})
    with pytest.raises(DataError, match=r"only in train \['b'\]"):
        load_dataset("imagefolder", tmp_path / "d")


def test_imagefolder_empty_or_missing(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_dataset("imagefolder", tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    _write_folder(tmp_path / "d", {"a": (1, 1), "b": (1, 1)})
    (tmp_path / "d" / "test" / "c").mkdir()
    (tmp_path / "d" / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"without images .*test/c, train/c"):
        load_dataset("imagefolder", tmp_path / "d")


def test_imagefolder_with_one_class_is_refused(tmp_path: Path) -> None:
    """One class folder is no classification task: refused before any training (it trained to clean_acc 1.0)."""
    _write_folder(tmp_path / "d", {"only": (3, 2)})
    with pytest.raises(DataError, match=r"only one class folder \(only\).*two or more classes"):
        load_dataset("imagefolder", tmp_path / "d")
    with pytest.raises(DataError, match="only one class folder"):
        load_dataset("imagefolder", _tar(tmp_path / "d", tmp_path / "d.tar.gz"))


def test_imagefolder_sizes(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (1, 1)}, size=(8, 8))
    _write_folder(tmp_path / "d", {"b": (1, 1)}, size=(6, 4))
    with pytest.raises(DataError, match=r"dataset.image_size"):
        load_dataset("imagefolder", tmp_path / "d")
    bundle = load_dataset("imagefolder", tmp_path / "d", image_size=5)
    assert bundle.train.images.shape == (2, 3, 5, 5) and bundle.test.images.shape == (2, 3, 5, 5)


def test_imagefolder_bad_image_named(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (1, 1), "b": (1, 1)})
    (tmp_path / "d" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"train/a/broken.png"):
        load_dataset("imagefolder", tmp_path / "d")


def test_archive_skips_unsafe_members(tmp_path: Path) -> None:
    written = _write_folder(tmp_path / "d", {"a": (1, 1), "b": (1, 1)})
    archive = _tar(tmp_path / "d", tmp_path / "p.tar")
    with tarfile.open(archive, "a") as tar:
        tar.add(tmp_path / "d" / "train" / "a" / "000.png", arcname="../train/a/evil.png")
        tar.add(tmp_path / "d" / "train" / "a" / "000.png", arcname="train/a/._000.png")
    bundle = load_dataset("imagefolder", archive)
    assert bundle.train.paths == ("train/a/000.png", "train/b/000.png")
    _check_roundtrip(bundle, written, ["a", "b"])


def test_corrupt_archive(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (2, 2)})
    archive = _tar(tmp_path / "d", tmp_path / "p.tar.gz")
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_dataset("imagefolder", archive)


# ------------------------------------------------------------------------------ archive limits


class _Zeros:
    """A file-like source of ``n`` zero bytes, read in chunks (a huge member without holding it in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def _add_member(tar: tarfile.TarFile, name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    tar.addfile(info, _Zeros(size))


def test_member_declaring_terabytes_is_refused_before_reading(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (1, 1)})
    info = tarfile.TarInfo("train/a/huge.png")
    info.size = 10 << 40  # 10 TiB declared, nothing behind it: a 1.5 KB file
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(DataError, match=r"huge.png.* expands to 10,485,760 MiB, more than "
                                        r"dataset.archive_max_member_mb=256") as info_:
        load_dataset("imagefolder", archive)  # refused from the header, never read whole
    assert "\n" not in str(info_.value)


def test_gzip_bomb_member_is_refused_at_the_default_limit(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        _add_member(tar, "train/a/0.png", 300 << 20)  # 300 MiB of zeros: a few hundred KB compressed
        _add_member(tar, "test/a/0.png", 10)
    assert archive.stat().st_size < 2 << 20
    with pytest.raises(DataError, match="archive_max_member_mb=256"):
        load_dataset("imagefolder", archive)


@pytest.mark.parametrize(("limits", "needle"), [
    ({"archive_max_member_mb": 1}, "archive_max_member_mb=1"),
    ({"archive_max_total_gb": 4 / 1024}, "archive_max_total_gb"),
    ({"archive_max_members": 5}, "more than 5 members"),
])
def test_archive_limits_come_from_the_dataset_config(tmp_path: Path, limits: dict, needle: str) -> None:
    from potion.data.poisoned import load_data

    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for i in range(6):  # 6 members of 1.5 MiB: 9 MiB expanded
            _add_member(tar, f"train/a/{i}.bin", 3 << 19)
    cfg = {"name": "imagefolder", "source": "imagefolder", "path": str(archive), **limits}
    with pytest.raises(DataError, match=needle):
        load_data(cfg)


def test_oversized_tar_header_is_refused(tmp_path: Path) -> None:
    """A pax header is read whole by tarfile before any member is seen: it counts as a member."""
    archive = tmp_path / "pax.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tar:
        info = tarfile.TarInfo("train/a/0.png")
        info.pax_headers = {"comment": "x" * (3 << 20)}
        tar.addfile(info, _Zeros(0))
    with pytest.raises(DataError, match="tar header larger than 1 MiB"):
        load_dataset("imagefolder", archive, archive_limits={"archive_max_member_mb": 1})


def _check_dataset(**values: object) -> None:
    """The schema's check of a dataset config: the one place its values are checked before data is read."""
    base = {"name": "digits", "source": "digits", "path": None, "download": False, "image_size": None,
            "mean": None, "std": None}
    check_node(Dataset, {**base, **values}, "dataset")


@pytest.mark.parametrize("bad", [0, -1, "abc", True, float("nan")])
def test_bad_archive_limit_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="dataset.archive_max_member_mb"):
        _check_dataset(archive_max_member_mb=bad)


def test_archive_within_limits_still_loads(tmp_path: Path) -> None:
    written = _write_folder(tmp_path / "d", {"a": (2, 1), "b": (1, 1)})
    archive = _tar(tmp_path / "d", tmp_path / "ok.tar.gz")
    bundle = load_dataset("imagefolder", archive, archive_limits={"archive_max_member_mb": 1,
                                                                   "archive_max_total_gb": 0.01})
    _check_roundtrip(bundle, written, ["a", "b"])


# ------------------------------------------------------------------------------ CIFAR pickles


def _write_cifar(root: Path, source: str, n: int = 4, num_classes: int = 3, key_type: type = str) -> Path:
    rng = np.random.default_rng(1)
    k = (lambda s: s.encode()) if key_type is bytes else (lambda s: s)
    layout = LAYOUTS[source]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(num_classes)]
    with open(folder / layout.meta, "wb") as fh:
        pickle.dump({k(layout.names_key): names, k("num_cases_per_batch"): n}, fh)
    for i, name in enumerate(layout.files[:-1]):
        batch = {
            k("batch_label"): f"batch {i}",
            k("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            k(layout.label_key): [int(x) for x in rng.integers(0, num_classes, n)],
            k("filenames"): [f"f{j}.png" for j in range(n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2 if i % 2 else pickle.HIGHEST_PROTOCOL)
    return folder


@pytest.mark.parametrize(("source", "n_train_files"), [("cifar10", 5), ("cifar100", 1)])
@pytest.mark.parametrize("key_type", [str, bytes])
def test_cifar_pickles(tmp_path: Path, source: str, n_train_files: int, key_type: type) -> None:
    folder = _write_cifar(tmp_path, source, key_type=key_type)
    bundle = load_dataset(source, str(tmp_path))
    assert bundle.name == source and bundle.classes == ("class0", "class1", "class2")
    assert bundle.train.images.shape == (4 * n_train_files, 3, 32, 32) and bundle.test.images.shape == (4, 3, 32, 32)
    assert bundle.train.paths is None
    with open(folder / LAYOUTS[source].test[0], "rb") as fh:
        raw = pickle.load(fh)
    label_key = LAYOUTS[source].label_key
    raw = {(key.decode() if isinstance(key, bytes) else key): v for key, v in raw.items()}
    assert bundle.test.labels.tolist() == raw[label_key]
    assert np.array_equal(bundle.test.images.numpy(), raw["data"].reshape(-1, 3, 32, 32))
    # the pickle folder itself is also accepted as the path
    assert load_dataset(source, folder).fingerprint == bundle.fingerprint


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_cifar_malicious_pickle_refused(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, fh)
    with pytest.raises(DataError, match=r"refused to load .*data_batch_1"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, "cifar100")
    (folder / "train").write_bytes((folder / "train").read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt or truncated CIFAR file"):
        load_dataset("cifar100", tmp_path)


def test_cifar_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path / "nope")
    msg = str(info.value)
    assert str(tmp_path / "nope") in msg and "imagefolder" in msg and "download" in msg and "\n" not in msg


def test_cifar_download_uses_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeCIFAR100:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            _write_cifar(Path(root), "cifar100")

    monkeypatch.setitem(sys.modules, "torchvision.datasets", types.SimpleNamespace(CIFAR100=FakeCIFAR100))
    bundle = load_dataset("cifar100", tmp_path / "dl", download=True)
    assert calls == [(str(tmp_path / "dl"), True)] and len(bundle.train) == 4


# ------------------------------------------------------------------------------ digits


@pytest.mark.slow  # imports scikit-learn and decodes the digits
def test_digits() -> None:
    bundle = load_dataset("digits")
    assert bundle.train.images.shape[1:] == (1, 8, 8) and bundle.classes == tuple("0123456789")
    assert len(bundle.train) + len(bundle.test) == 1797
    counts = torch.bincount(bundle.test.labels, minlength=10)
    totals = counts + torch.bincount(bundle.train.labels, minlength=10)
    assert torch.all((counts.float() / totals.float() - 0.2).abs() < 0.01)
    assert int(bundle.train.images.max()) == 255
    again = load_dataset("digits", use_cache=False)
    assert torch.equal(again.test.images, bundle.test.images) and torch.equal(again.test.labels, bundle.test.labels)
    big = load_dataset("digits", image_size=16)
    assert big.train.images.shape[1:] == (1, 16, 16) and big.fingerprint != bundle.fingerprint


# ------------------------------------------------------------------------------ cache


def test_cache_hit_corrupt_and_content(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _write_folder(tmp_path / "d", {"a": (2, 1), "b": (1, 1)})
    first = load_dataset("imagefolder", tmp_path / "d")
    cache_file = cache / "datasets" / f"{first.fingerprint}.npz"
    assert cache_file.is_file()

    real_decode = sources._decode
    monkeypatch.setattr(sources, "_decode", lambda *a: pytest.fail("decoded despite a cached copy"))
    second = load_dataset("imagefolder", tmp_path / "d")
    assert second.fingerprint == first.fingerprint and second.train.paths == first.train.paths
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.test.labels, first.test.labels)

    monkeypatch.setattr(sources, "_decode", real_decode)
    cache_file.write_bytes(cache_file.read_bytes()[:300])
    with caplog.at_level(logging.WARNING, logger="potion.data.sources"):
        third = load_dataset("imagefolder", tmp_path / "d")
    assert "unreadable" in caplog.text
    assert torch.equal(third.train.images, first.train.images)
    assert read_cache(cache_file) is not None  # rebuilt and valid again

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "d" / "test" / "b" / "000.png")
    assert load_dataset("imagefolder", tmp_path / "d").fingerprint != first.fingerprint


def test_use_cache_false_writes_nothing(tmp_path: Path, cache: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (1, 1), "b": (1, 1)})
    load_dataset("imagefolder", tmp_path / "d", use_cache=False)
    assert not (cache / "datasets").exists()


# ------------------------------------------------------------------------------ normalisation and config


def test_mean_std_computed_and_given(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", {"a": (3, 1), "b": (2, 1)})
    bundle = load_dataset("imagefolder", tmp_path / "d")
    x = bundle.train.images.double() / 255
    assert np.allclose(bundle.mean, x.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(bundle.std, x.std(dim=(0, 2, 3), unbiased=False).numpy())
    given = load_dataset("imagefolder", tmp_path / "d", mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25))
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)
    assert given.fingerprint == bundle.fingerprint
    with pytest.raises(ConfigError, match="3 channel"):
        load_dataset("imagefolder", tmp_path / "d", mean=[0.5], std=[0.2])
    with pytest.raises(ConfigError, match="> 0"):
        _check_dataset(std=[0.2, 0.0, 0.2])


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        _check_dataset(source="mnist")
    with pytest.raises(ConfigError, match="image_size"):
        _check_dataset(image_size=0)
    with pytest.raises(ConfigError, match="dataset.path"):
        _check_dataset(source="imagefolder")
