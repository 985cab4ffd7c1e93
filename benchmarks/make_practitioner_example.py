"""Turn a training run into a "heal your own model" example: the poison baked into image files.

    python benchmarks/make_practitioner_example.py runs/train/<run folder> --out <folder> [--share 0.1] [--seed 0]

train.py pastes its trigger on the fly, so its data set on disk is clean. This script writes what a
practitioner has instead: ``<out>/data/{train,test}/<class>/*.png`` with every poisoned training image of
the run's plan carrying the trigger in its pixels and moved into the target class folder (named
``<original class>-<name>.png``), ``<out>/discovered.txt`` (the share of the poison that ``unlearn.py
discovery.share=<share>`` would discover with this seed), ``<out>/poisoned_all.txt`` (every poisoned file:
the ground truth to check suspects.csv against) and ``<out>/heal_command.txt``, the ``python -m potion.heal``
command that heals the run's ``model.safetensors`` with them (also printed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from potion.data.augment import Normalizer  # noqa: E402
from potion.data.discovery import discover  # noqa: E402
from potion.data.poison import Trigger, TriggerSpec  # noqa: E402
from potion.data.poisoned import load_data  # noqa: E402
from potion.pipelines.run_folders import WEIGHTS, load_trained_run  # noqa: E402

MODEL_GROUPS = {"resnet9": "resnet9", "small_cnn": "small_cnn", "wrn": "wrn28x10"}  # model name -> conf/model/


def bake(images: torch.Tensor, trigger: Trigger, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The trigger in pixel space: pasted exactly as training pastes it, then back to uint8 (clipped to [0, 255])."""
    m = torch.tensor(mean).view(1, -1, 1, 1) * 255
    s = torch.tensor(std).view(1, -1, 1, 1) * 255
    x = trigger.apply(Normalizer(mean, std)(images))
    return (x * s + m).round().clamp(0, 255).to(torch.uint8)


def save_png(image: torch.Tensor, path: Path) -> None:
    arr = image.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0))).save(path)


def file_name(paths: tuple[str, ...] | None, i: int) -> str:
    return f"{PurePosixPath(paths[i]).stem}.png" if paths else f"{i:05d}.png"


def heal_command(run_dir: Path, out: Path, run, mean, std) -> str:
    model = run.cfg.model
    name = str(model.name)
    args = [f"model={MODEL_GROUPS[name]}" if name in MODEL_GROUPS else f"model.name={name}"]
    args += [f"model.{k}={v}" for k, v in model.items() if k != "name"]
    spec = run.plan.trigger.to_dict()
    default = TriggerSpec().to_dict()
    trig = ", ".join(f"{k}: {v}" for k, v in spec.items() if k == "kind" or v != default[k]).replace("None", "null")
    args = ["python", "-m", "potion.heal", f"checkpoint={run_dir / WEIGHTS}", f"dataset.path={out / 'data'}",
            f"discovered={out / 'discovered.txt'}", *args,
            f"dataset.mean=[{','.join(repr(v) for v in mean)}]", f"dataset.std=[{','.join(repr(v) for v in std)}]",
            f"trigger={{{trig}}}", f"out_dir={out / 'healed'}"]
    return " ".join(shlex.quote(a) for a in args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished training run folder (printed by train.py)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write data/, discovered.txt, ...")
    ap.add_argument("--share", type=float, default=0.1, help="discovered share of the poison (default 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="discovery seed (unlearn.py's discovery.seed, default 0)")
    a = ap.parse_args()

    run = load_trained_run(a.run)
    bundle = load_data(run.cfg.dataset)
    plan = run.plan
    if list(bundle.classes) != sorted(bundle.classes):
        sys.exit(f"error: the classes of {run.cfg.dataset.name} are not in alphabetical order, which an image folder "
                 "imposes; the exported labels would not match the model's outputs")
    _, c, h, w = bundle.train.images.shape
    trigger = Trigger(plan.trigger, c, h, w, bundle.mean, bundle.std)
    poisoned = set(plan.indices)
    target = bundle.classes[plan.target]
    data = a.out / "data"
    rel: dict[int, str] = {}
    for split in ("train", "test"):
        part = getattr(bundle, split)
        baked = dict(zip(plan.indices, bake(part.images[list(plan.indices)], trigger, bundle.mean, bundle.std),
                         strict=True)) if split == "train" else {}
        for i in range(len(part)):
            cls = bundle.classes[int(part.labels[i])]
            name = file_name(part.paths, i)
            if i in baked:
                path = f"train/{target}/{cls}-{name}"
                rel[i] = path
                save_png(baked[i], data / path)
            else:
                save_png(part.images[i], data / f"{split}/{cls}/{name}")
        print(f"{split}: {len(part)} images written", flush=True)
    assert len(rel) == len(poisoned)
    found = discover(plan, share=a.share, seed=a.seed).forget_idx.tolist()
    (a.out / "discovered.txt").write_text("".join(f"{rel[i]}\n" for i in found))
    (a.out / "poisoned_all.txt").write_text("".join(f"{rel[i]}\n" for i in plan.indices))
    cmd = heal_command(a.run, a.out, run, bundle.mean, bundle.std)
    (a.out / "heal_command.txt").write_text(cmd + "\n")
    print(f"{len(poisoned)} poisoned training files baked into {data}/train/{target}/; "
          f"{len(found)} listed in {a.out / 'discovered.txt'}")
    print(f"heal the run's model with them:\n  {cmd}")


if __name__ == "__main__":
    main()
