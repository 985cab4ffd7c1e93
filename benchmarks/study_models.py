"""The study tier's trained models travel with the repository: save finished run folders, restore them on a new machine.

    python benchmarks/study_models.py save      # runs/train/study_cpu-* -> benchmarks/study/cpu_tier/models
    python benchmarks/study_models.py restore   # and back, where runs/train lacks them
    python benchmarks/study_models.py restore --runs .study/<commit>/runs/train   # into the study's worktree

Only what a finished run is made of is kept: weights (safetensors), the resolved config, the poison plan, the
perturbed images of a label-consistent attack, run.json and summary.json (written last: a folder without it is
not finished and is skipped). Lightning checkpoints (pickles) stay behind. ``train.py`` and ``unlearn.py``
find a restored folder by its config hash and reuse it instead of training again.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from potion.core.errors import PotionError
from potion.core.io import read_json

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("model.safetensors", "config.yaml", "poison_plan.json", "poison_images.safetensors", "run.json",
        "summary.json")  # summary.json last: a copy cut short is not a finished run


def finished(folder: Path) -> bool:
    """A training run folder whose summary was written (the last file a finished run writes)."""
    try:
        return "config_hash" in read_json(folder / "summary.json")
    except (OSError, ValueError, PotionError):
        return False


def copy_run(src: Path, dst: Path) -> bool:
    """Copy a finished run's files (summary.json last); False when ``src`` is unfinished or ``dst`` is finished."""
    if not finished(src) or finished(dst):
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "restore"])
    ap.add_argument("--tier", default="cpu_tier", help="benchmarks/study/<tier>")
    ap.add_argument("--prefix", default="study_cpu-", help="training run folders of the tier")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "train",
                    help="the training run folders (the frozen study worktree: .study/<commit>/runs/train)")
    args = ap.parse_args()
    runs, kept = args.runs, ROOT / "benchmarks" / "study" / args.tier / "models"
    src, dst = (runs, kept) if args.action == "save" else (kept, runs)
    copied = [p.name for p in sorted(src.glob(f"{args.prefix}*")) if copy_run(p, dst / p.name)]
    print(f"{args.action}: {len(copied)} run folder(s) {'into' if args.action == 'save' else 'from'} {kept}"
          + "".join(f"\n  {name}" for name in copied))


if __name__ == "__main__":
    main()
