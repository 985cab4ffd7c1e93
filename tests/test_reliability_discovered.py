"""potion.heal's discovered list names files of the data root, never files elsewhere that merely end alike."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from potion.core.errors import DataError
from potion.data.sources import load_dataset
from potion.pipelines.heal_inputs import resolve_discovered


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def data(tmp_path: Path, cache: Path) -> Path:
    return _folder(tmp_path / "set")


def test_paths_into_the_data_root_are_accepted(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_dataset("imagefolder", data)
    monkeypatch.chdir(tmp_path)
    entries = ["train/b/0.png", str(data / "train" / "b" / "1.png"), "set/train/b/2.png"]
    idx = resolve_discovered(entries, bundle, "found.txt", str(data))
    assert [bundle.train.paths[i] for i in idx.tolist()] == ["train/b/0.png", "train/b/1.png", "train/b/2.png"]


@pytest.mark.parametrize("where", ["absolute", "relative", "parent"])
def test_files_outside_the_data_root_are_refused(data: Path, tmp_path: Path, where: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_dataset("imagefolder", data)
    other = tmp_path / "elsewhere"
    shutil.copytree(data, other)  # the same names in another folder: not files of this data set
    monkeypatch.chdir(tmp_path)
    entry = {"absolute": str(other / "train" / "b" / "0.png"), "relative": "elsewhere/train/b/0.png",
             "parent": os.path.join("..", "elsewhere", "train", "b", "0.png")}[where]
    with pytest.raises(DataError, match="not training images"):  # the whole path counts, not its train/... suffix
        resolve_discovered([entry], bundle, "found.txt", str(data))


def test_archive_entries_may_name_only_its_top_folder(tmp_path: Path, cache: Path) -> None:
    import tarfile

    data = _folder(tmp_path / "set")
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data, arcname="top")
    bundle = load_dataset("imagefolder", archive)
    idx = resolve_discovered(["top/train/a/1.png"], bundle, "found.txt", str(archive))
    assert bundle.train.paths[int(idx[0])] == "train/a/1.png"
    for entry in ("/abs/top/train/a/1.png", "x/y/train/a/1.png", "../train/a/1.png"):
        with pytest.raises(DataError, match="not training images"):
            resolve_discovered([entry], bundle, "found.txt", str(archive))
