"""A checkpoint written with pickle.dump is named for what it is, and no message repeats torch's advice to load it
with ``weights_only=False`` (which runs the file's code)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from potion.core.errors import CheckpointError
from potion.core.io import load_tensors


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_raw_pickle_is_called_a_pickle_not_corrupt(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        load_tensors(path)
    text = str(info.value)
    assert "plain Python pickle" in text and "torch.save(model.state_dict()" in text
    assert "corrupt" not in text and "weights_only" not in text


def test_damaged_files_stay_corrupt_without_torchs_hint(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_tensors(legacy)["w"], torch.ones(3))  # the legacy format still loads
    cut = tmp_path / "cut.pt"
    cut.write_bytes(legacy.read_bytes()[:40])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 4)
    for path in (cut, garbage):
        with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
            load_tensors(path)
        assert "weights_only" not in str(info.value) and "plain Python pickle" not in str(info.value)
