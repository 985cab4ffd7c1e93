"""Caches are checked against the digest stored with them, and a full disk is one line, not a traceback."""

from __future__ import annotations

import errno
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from potion.core import io as pio
from potion.core.io import StorageError, load_tensors, read_tensor_metadata, save_tensors
from potion.data import sources
from potion.unlearning import cache

pytestmark = pytest.mark.usefixtures("cache")  # every test in its own cache folder (tests/conftest.py)


def _logits() -> dict[str, torch.Tensor]:
    return {"test_clean": torch.linspace(-1, 1, 60).view(20, 3), "train": torch.ones(8, 3)}


# ------------------------------------------------------------------------------------------------ tensor caches


def test_same_shape_replacement_of_a_cache_entry_is_recomputed(tmp_path: Path) -> None:
    path = cache.entry_path("logits", weights="w", data="d")
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return _logits()

    first, hit = cache.cached_tensors(path, compute)
    assert not hit and read_tensor_metadata(path)[cache.DIGEST_KEY]
    assert cache.cached_tensors(path, compute)[1] is True and len(calls) == 1

    # same names, shapes and dtypes, other values, the old header's digest kept (what cp of another entry gives)
    forged = {k: torch.zeros_like(v) for k, v in first.items()}
    save_tensors(path, forged, metadata=read_tensor_metadata(path))
    value, hit = cache.cached_tensors(path, compute)
    assert not hit and len(calls) == 2  # the digest does not match: recomputed, not trusted
    assert all(torch.equal(value[k], first[k]) for k in first)
    assert all(torch.equal(load_tensors(path)[k], first[k]) for k in first)  # rewritten with the true values


def test_cache_entry_without_a_digest_is_not_trusted() -> None:
    path = cache.entry_path("importance", test="no digest")
    save_tensors(path, {k: torch.zeros_like(v) for k, v in _logits().items()})  # an older or foreign entry
    value, hit = cache.cached_tensors(path, _logits)
    assert not hit and torch.equal(value["train"], torch.ones(8, 3))


def test_a_cache_that_cannot_be_written_costs_a_recomputation_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio, "write_torch", lambda obj, p: full(p))
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: full(Path("x")))
    path = cache.entry_path("logits", weights="full disk")
    value, hit = cache.cached_tensors(path, _logits)
    assert not hit and torch.equal(value["train"], torch.ones(8, 3))
    assert not path.exists() and not list(path.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ full disk


def test_full_disk_is_a_one_line_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"

    def no_space(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(StorageError) as info:
        pio.atomic_write_json(run / "summary.json", {"a": 1})
    text = str(info.value)
    assert "\n" not in text and "no space left" in text and str(run / "summary.json") in text
    assert isinstance(info.value, OSError)  # cache writers that treat OSError as a miss keep working
    assert not list(run.iterdir())  # no temp file left


def test_torch_save_on_a_full_disk_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a full disk as RuntimeError('unexpected pos ...'): the free space tells what it was."""
    def torch_full(obj: Any, path: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 367872 vs 367768")

    monkeypatch.setattr(pio, "write_torch", torch_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    with pytest.raises(StorageError, match="no space left"):
        save_tensors(tmp_path / "last.ckpt", {"w": torch.zeros(3)})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: not called a full disk
        save_tensors(tmp_path / "last.ckpt", {"w": torch.zeros(3)})


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_torch_checkpoint_on_a_full_disk_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_torch hands torch.save a Python file, so the OS error arrives as ENOSPC (not "unexpected pos")."""
    monkeypatch.setattr(pio, "open", lambda path, mode: _FullDisk(), raising=False)
    with pytest.raises(StorageError, match="no space left") as info:
        save_tensors(tmp_path / "model.pt", {"w": torch.zeros(1000)})
    assert "Traceback" not in str(info.value) and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ dataset cache


def _digits_entry(cache_root: Path) -> Path:
    sources.load_dataset("digits")
    (entry,) = (cache_root / "datasets").glob("*.npz")
    return entry


def test_same_shape_replacement_of_the_dataset_cache_is_rebuilt() -> None:
    entry = _digits_entry(pio.cache_dir())
    reference = sources.load_dataset("digits")
    with np.load(entry, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["train_labels"] = np.zeros_like(arrays["train_labels"])  # passes every shape and range check
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # the old digest field kept
    entry.write_bytes(buf.getvalue())

    again = sources.load_dataset("digits")
    assert torch.equal(again.train.labels, reference.train.labels)  # the entry is recomputed: labels as decoded
    assert again.fingerprint == reference.fingerprint
