"""A tiny, fast, learnable image folder for end-to-end tests: 4 classes of 16x16 RGB patterns."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ("airplane", "bird", "cat", "dog")
SIZE = 16


def pattern(cls: int, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 RGB uint8 image of class ``cls``: horizontal stripes, vertical stripes, checkers or a blob."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    phase = rng.integers(0, 4)
    if cls == 0:
        base = ((yy + phase) // 2) % 2
    elif cls == 1:
        base = ((xx + phase) // 2) % 2
    elif cls == 2:
        base = (xx // 2 + yy // 2 + phase) % 2
    else:
        cy, cx = rng.integers(5, 11, size=2)
        base = ((yy - cy) ** 2 + (xx - cx) ** 2 < 12).astype(int)
    color = rng.uniform(0.5, 1.0, size=3)
    img = 30 + 140 * base[None] * color[:, None, None] + rng.normal(0, 12, size=(3, SIZE, SIZE))
    return np.clip(img, 20, 190).astype(np.uint8)


def write_pattern_folder(root: Path, n_train: int = 80, n_test: int = 40, seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png under ``root`` (clean: the pipeline poisons on the fly)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pattern(c, rng).transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    return root


def train_overrides(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """Train overrides for a small poisoned model on the pattern folder (a few seconds on one core)."""
    return ["dataset=imagefolder", f"dataset.path={data}", "model=small_cnn", "model.width=8", "poison.count=16",
            "poison.fraction=null", "train.epochs=8", "train.batch_size=32", "train.lr=0.05", "train.crop_padding=1",
            "train.flip=false", "train.epoch_eval_samples=80", f"out_dir={out_dir}", *extra]

# a short PTN search for tests that sweep over a server or a cluster
QUICK_PTN = ["method=potion", "discovery.share=0.5", "method.ptn.s_start=0.01", "method.ptn.s_step=1.5",
             "method.ptn.max_steps=40"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def defender_task(model: Any, data: Any, discovery: Any, *, attack: dict | None = None, **parts: Any) -> Any:
    """The UnlearnTask the pipelines build for ``data`` (the defender's view and the inferred attack facts)."""
    import torch

    from potion.data.defender import defender_view
    from potion.unlearning.attack import infer_attack
    from potion.unlearning.task import UnlearnTask

    view = defender_view(data)
    facts = infer_attack(view.labels[discovery.forget_idx], attack, view.num_classes)
    parts.setdefault("device", torch.device("cpu"))
    return UnlearnTask(model=model, train=view, discovery=discovery, attack=facts, **parts)
