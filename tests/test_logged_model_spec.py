"""A downloaded logged model's model.json is input from elsewhere: it opens no file outside its folder and asks for
no absurd network (load_logged_model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from potion.core.errors import CheckpointError
from potion.models.small_cnn import SmallCNN
from potion.tracking.extras import MODEL_FORMAT
from potion.tracking.logged_model import load_logged_model


def _folder(root: Path, **spec: object) -> Path:
    """A logged-model folder of a SmallCNN (width 4, 3 classes, 3 channels); ``spec`` overrides model.json keys."""
    root.mkdir(parents=True, exist_ok=True)
    save_file(SmallCNN(num_classes=3, in_channels=3, width=4).state_dict(), str(root / "model.safetensors"))
    base = {"format": MODEL_FORMAT, "architecture": "small_cnn", "kwargs": {"width": 4}, "num_classes": 3,
            "channels": 3, "key_prefix": "", "weights": "model.safetensors"}
    (root / "model.json").write_text(json.dumps({**base, **spec}))
    return root


def test_a_good_spec_loads(tmp_path: Path) -> None:
    model, spec = load_logged_model(_folder(tmp_path / "m"))
    assert spec["num_classes"] == 3 and not model.training


@pytest.mark.parametrize("weights", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_weights_outside_the_folder_are_refused_unopened(tmp_path: Path, weights: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path / "m", weights=weights)
    save_file(SmallCNN(num_classes=3, in_channels=3, width=4).state_dict(), str(tmp_path / "outside.safetensors"))
    opened: list[Path] = []
    import potion.tracking.logged_model as lm

    monkeypatch.setattr(lm, "load_tensors", lambda p: opened.append(Path(p)) or pytest.fail(f"opened {p}"))
    with pytest.raises(CheckpointError, match="not a file of the model folder"):
        load_logged_model(folder)
    assert not opened


@pytest.mark.parametrize("bad", [-1, 0, 10**12, "10", 2.5, True, None])
def test_num_classes_out_of_range_is_one_error(tmp_path: Path, bad: object) -> None:
    with pytest.raises(CheckpointError, match=r"num_classes=.* must be an integer from 1 to"):
        load_logged_model(_folder(tmp_path / "m", num_classes=bad))


def test_channels_and_kwargs_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="channels="):
        load_logged_model(_folder(tmp_path / "a", channels=10**9))
    with pytest.raises(CheckpointError, match="kwargs a mapping"):
        load_logged_model(_folder(tmp_path / "b", kwargs=[1, 2]))
