"""Run folders: what a finished training run leaves on disk, and how later stages read it back safely.

A run folder holds ``config.yaml`` (resolved), ``poison_plan.json``, ``model.safetensors`` and, written
last, ``summary.json``; a folder without ``summary.json`` is unfinished and never mistaken for done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from omegaconf import DictConfig, OmegaConf

from potion.config import model_kwargs
from potion.data.poison import PoisonPlan
from potion.errors import CheckpointError
from potion.io import atomic_write_json, atomic_write_text, load_tensors, read_json, save_tensors
from potion.models import build_model

CONFIG = "config.yaml"
PLAN = "poison_plan.json"
WEIGHTS = "model.safetensors"
SUMMARY = "summary.json"


@dataclass
class TrainedRun:
    """A finished training run: its config, poison plan, weights and summary."""

    path: Path
    cfg: DictConfig
    plan: PoisonPlan
    state_dict: dict[str, Any]
    summary: dict[str, Any]

    def build_model(self, num_classes: int, in_channels: int) -> nn.Module:
        """The poisoned model with its trained weights."""
        model = build_model(self.cfg.model.name, num_classes, in_channels, **model_kwargs(self.cfg.model))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {self.path} do not fit model {self.cfg.model.name}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        return model


def write_config(run_dir: Path, cfg: Any) -> None:
    """Resolved config as YAML (atomic)."""
    text = OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else yaml.safe_dump(cfg)
    atomic_write_text(run_dir / CONFIG, text)


def write_plan(run_dir: Path, plan: PoisonPlan) -> None:
    """Poison plan as JSON (atomic)."""
    atomic_write_json(run_dir / PLAN, plan.to_dict())


def read_plan(path: Path) -> PoisonPlan:
    """Poison plan from JSON; a malformed file is a CheckpointError."""
    try:
        return PoisonPlan.from_dict(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed poison plan {path}: {exc}") from exc


def write_weights(run_dir: Path, model: nn.Module) -> Path:
    """Model weights as safetensors (atomic)."""
    return save_tensors(run_dir / WEIGHTS, model.state_dict())


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary, or None if the run is unfinished (no or unreadable summary)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except CheckpointError:
        return None


def load_trained_run(path: str | Path) -> TrainedRun:
    """Read a finished run folder, refusing unfinished or unsafe ones with one clear line."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise CheckpointError(f"train_run={path}: no such run folder (give the folder train.py printed, "
                              "or mlflow:<run id>)")
    summary = read_summary(run_dir)
    if summary is None:
        raise CheckpointError(f"train_run={path}: the run is unfinished (no summary.json); rerun train.py "
                              "with the same overrides to resume it")
    try:
        cfg = OmegaConf.create(yaml.safe_load((run_dir / CONFIG).read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {run_dir / CONFIG}: {exc}") from exc
    plan = read_plan(run_dir / PLAN)
    state = load_tensors(run_dir / WEIGHTS)
    return TrainedRun(run_dir, cfg, plan, state, summary)
