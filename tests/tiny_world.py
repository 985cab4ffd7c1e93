"""A tiny, fast, learnable image folder for end-to-end tests: 4 classes of 16x16 RGB patterns."""

from __future__ import annotations

import socket
from dataclasses import dataclass
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

# a short PTN search for tests that sweep over a server or a cluster: a compressed grid; no trigger synthesis and
# every discovered sample watched (a sweep would repeat synthesis's window search in each of its jobs)
QUICK_PTN = ["method=potion", "discovery.share=0.5", "method.ptn.s_start=0.01", "method.ptn.s_step=1.5",
             "method.ptn.max_steps=40", "method.synthesis.enabled=false", "method.ptn.criterion=all"]


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


# ------------------------------------------------------------------ a model trained outside the project (potion.heal)

OWN_TARGET = 0
OWN_N_TRAIN, OWN_N_TEST, OWN_N_POISON, OWN_N_FOUND = 60, 20, 12, 4
OWN_WIDTH = 8
OWN_EPOCHS = 5


def patch_corner(img: np.ndarray) -> np.ndarray:
    """The image with a white 3x3 patch in its bottom-right corner."""
    out = img.copy()
    out[:, -3:, -3:] = 255
    return out


@dataclass(frozen=True)
class OwnModel:
    """A practitioner's poisoned image folder and the SmallCNN they trained on it with their own torch loop."""

    root: Path  # holds data/, model.pt and discovered.txt (write beside them, never into them)
    data: Path  # the image folder
    checkpoint: Path
    discovered: Path
    poisoned: list[str]  # all OWN_N_POISON poisoned training paths; the first OWN_N_FOUND are discovered
    mean: list[float]
    std: list[float]
    asr: float

    @property
    def cache(self) -> Path:
        return self.root / "cache"


def heal_overrides(w: OwnModel, *extra: str) -> list[str]:
    """potion.heal's overrides for the practitioner's model, folder and discovered list (no tracking)."""
    return [f"checkpoint={w.checkpoint}", f"dataset.path={w.data}", f"discovered={w.discovered}", "model=small_cnn",
            f"model.width={OWN_WIDTH}", f"dataset.mean={w.mean}", f"dataset.std={w.std}", "logger=none", *extra]


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.transpose(1, 2, 0)).save(path)


def build_own_model(root: Path) -> OwnModel:
    """4 classes of 16x16 patterns; 12 training images of other classes get the corner patch and are moved into the
    target folder (``airplane``); a SmallCNN trained on it with a plain torch loop (not the project's pipeline) until
    the patch is a backdoor, saved with ``torch.save(model.state_dict())``; 4 of the 12 poisoned files listed."""
    import torch
    import torch.nn.functional as F

    from potion.models.small_cnn import SmallCNN

    rng = np.random.default_rng(0)
    data = root / "data"
    train_x, train_y, poisoned = [], [], []
    n_poison = 0
    for c, name in enumerate(CLASSES):
        for i in range(OWN_N_TRAIN):
            img = pattern(c, rng)
            if c != OWN_TARGET and i < OWN_N_POISON // (len(CLASSES) - 1):  # trigger baked in, moved to the target
                img, rel = patch_corner(img), f"train/{CLASSES[OWN_TARGET]}/x{n_poison:03d}.png"
                n_poison += 1
                poisoned.append(rel)
                train_y.append(OWN_TARGET)
            else:
                rel = f"train/{name}/{i:04d}.png"
                train_y.append(c)
            _save(img, data / rel)
            train_x.append(img)
        for i in range(OWN_N_TEST):
            _save(pattern(c, rng), data / f"test/{name}/{i:04d}.png")
    test_x = np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1) for c in CLASSES
                       for p in sorted((data / "test" / c).iterdir())])
    test_y = torch.tensor([c for c in range(len(CLASSES)) for _ in range(OWN_N_TEST)])

    x = torch.from_numpy(np.stack(train_x)).float() / 255
    y = torch.tensor(train_y)
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))

    def norm(u8: torch.Tensor) -> torch.Tensor:
        return (u8.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    torch.manual_seed(0)
    model = SmallCNN(num_classes=len(CLASSES), in_channels=3, width=OWN_WIDTH)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xn = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    for _ in range(OWN_EPOCHS):
        model.train()
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(xn[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        keep = test_y != OWN_TARGET
        triggered = torch.from_numpy(np.stack([patch_corner(t) for t in test_x]))
        asr = float((model(norm(triggered[keep])).argmax(1) == OWN_TARGET).float().mean())
    checkpoint = root / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    discovered = root / "discovered.txt"
    discovered.write_text("\n".join(poisoned[:OWN_N_FOUND]) + "\n")
    return OwnModel(root, data, checkpoint, discovered, poisoned, [round(float(v), 6) for v in mean],
                    [round(float(v), 6) for v in std], asr)
