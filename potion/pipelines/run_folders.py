"""Run folders: what a run leaves on disk, and how later stages read it back safely.

``summary.json`` is written last, so a folder without it is unfinished and never mistaken for done. Every file read
back is checked before use: plain YAML values only (no interpolation, no ``_target_``), a poison plan that fits its
data set, a summary that is a JSON object.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from potion.config.compose import identity_hash, model_kwargs
from potion.core.errors import CheckpointError, ConfigError
from potion.core.io import (
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    load_tensors,
    one_line,
    read_json,
    storage_error,
)
from potion.data.poison import PoisonPlan
from potion.models import MODELS, build_model
from potion.tracking.runs import SUMMARY

log = logging.getLogger("potion.pipelines.run_folders")

CONFIG = "config.yaml"
PLAN = "poison_plan.json"
WEIGHTS = "model.safetensors"
POISON_IMAGES = "poison_images.safetensors"  # label-consistent attack: the perturbed poisoned images
MARKER = "run.json"
CHECKPOINTS = "checkpoints"
# Files and folders that only a run writes: a folder holding one of them holds a run.
RUN_FILES = (MARKER, SUMMARY, CONFIG, PLAN, WEIGHTS, CHECKPOINTS, "suspects.csv", "ptn_trajectory.csv",
             "report.md", "healed.pt", "healed.safetensors")
KIND_WORDS = {"train": "a training run", "unlearn": "an unlearning run", "heal": "a potion.heal run",
              "unknown": "a run of unknown kind"}


@dataclass
class TrainedRun:
    """A finished training run: its config, poison plan, weights and summary."""

    path: Path
    cfg: DictConfig
    plan: PoisonPlan
    state_dict: dict[str, Any]
    summary: dict[str, Any]
    poison_images: torch.Tensor | None = None  # uint8, aligned with plan.indices (label-consistent attack)

    def build_model(self, num_classes: int, in_channels: int) -> nn.Module:
        """The poisoned model with its trained weights."""
        model = build_model(self.cfg.model.name, num_classes, in_channels, **model_kwargs(self.cfg.model))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {self.path} do not fit model {self.cfg.model.name}: "
                                  f"{one_line(exc, limit=1000)}") from exc
        return model


# --------------------------------------------------------------------------------------------- writing


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """Resolved config as YAML (atomic)."""
    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def write_plan(run_dir: Path, plan: PoisonPlan) -> None:
    """Poison plan as JSON (atomic)."""
    atomic_write_json(run_dir / PLAN, plan.to_dict())


# --------------------------------------------------------------------------------------------- poison plans


def read_plan(path: Path) -> PoisonPlan:
    """Poison plan from JSON, checked for what no data set can fit; a malformed file is a CheckpointError."""
    raw = read_json(path)
    try:
        _check_plan_fields(raw)
        return PoisonPlan.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed poison plan {path}: {exc}") from exc


def _int_list(raw: Mapping[str, Any], key: str) -> list[int]:
    values = raw[key]
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key} must be a list of integers")
    return values


def _check_plan_fields(raw: Any) -> None:
    """Indices unique and in [0, num_train), one true label per index, labels and target >= 0."""
    if not isinstance(raw, dict):
        raise TypeError(f"a JSON object is expected, got {type(raw).__name__}")
    num_train, target = raw["num_train"], raw["target"]
    for key, value in (("num_train", num_train), ("target", target)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be an integer")
    indices, labels = _int_list(raw, "indices"), _int_list(raw, "true_labels")
    if num_train < 1:
        raise ValueError(f"num_train={num_train} must be >= 1")
    _check_index_list("indices", indices, num_train)
    if raw.get("noise_indices") is not None:
        _check_index_list("noise_indices", _int_list(raw, "noise_indices"), num_train)
    num_classes = raw.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer or absent")
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} true_labels for {len(indices)} indices")
    if target < 0 or any(v < 0 for v in labels):
        raise ValueError("target and true_labels must be class indices >= 0")


def _check_index_list(key: str, indices: list[int], num_train: int) -> None:
    bad = [i for i in indices if not 0 <= i < num_train]
    if bad:
        raise ValueError(f"{key}: index {bad[0]} is outside [0, {num_train - 1}] (num_train={num_train})")
    if len(set(indices)) != len(indices):
        seen: set[int] = set()
        dup = next(i for i in indices if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"{key}: index {dup} is listed twice")


def check_plan_fits(plan: PoisonPlan, bundle: Any, path: Path) -> None:
    """The plan belongs to this data set: same training-set size, classes in range, true labels as stored."""
    n, classes = len(bundle.train), bundle.num_classes
    where = f"poison plan {path}"
    if plan.num_train != n:
        raise CheckpointError(f"{where} was drawn for {plan.num_train} training samples, the data set has {n}: "
                              "use the data set the model was trained on")
    if plan.target >= classes or any(y >= classes for y in plan.true_labels):
        bad = plan.target if plan.target >= classes else max(plan.true_labels)
        raise CheckpointError(f"{where}: class {bad} is not a class of the data set (classes 0..{classes - 1})")
    if plan.num_classes is not None and plan.num_classes != classes:
        raise CheckpointError(f"{where} was drawn for {plan.num_classes} classes, the data set has {classes}")
    if plan.count:
        stored = bundle.train.labels[torch.tensor(plan.indices, dtype=torch.long)]
        if not torch.equal(stored, torch.tensor(plan.true_labels, dtype=torch.long)):
            raise CheckpointError(f"{where}: its true_labels differ from the data set's labels at its indices; "
                                  "use the data set the model was trained on")


# --------------------------------------------------------------------------------------------- summaries


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary, or None if the run is unfinished (no or unreadable summary).

    A summary that parses but is not a JSON object was not written by this project: a CheckpointError.
    """
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
    except CheckpointError:
        return None
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path} is not a run summary (a JSON {type(summary).__name__}, not an object); "
                              "delete it and rerun the command that made the run")
    return summary


# --------------------------------------------------------------------------------------------- run configs


def read_run_config(path: Path) -> DictConfig:
    """A run folder's config.yaml as plain values: nothing is resolved, instantiated or read from the environment.

    Refused: unreadable YAML, anything but a mapping, ``${...}`` interpolations (resolvers such as
    ``oc.env``), ``???`` values, ``_target_`` keys, and a config without dataset/model/poison/train sections
    or whose model arguments the model does not take.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path}: {one_line(exc, limit=1000)}"
                              ) from exc
    if not isinstance(raw, dict):
        what = "empty" if raw is None else f"a {type(raw).__name__}"
        raise CheckpointError(f"{path} is {what}, not a run config (a mapping); restore the file train.py wrote")
    problem = _unsafe_value(raw)
    if problem:
        raise CheckpointError(f"{path}: {problem}; a run folder's config holds plain values only (restore the "
                              "file train.py wrote)")
    _check_sections(raw, path)
    return OmegaConf.create(raw)


def _unsafe_value(node: Any, where: str = "") -> str | None:
    """Why a loaded YAML tree is not plain data, or None."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                return f"key {key!r} is not a string"
            if key == "_target_":
                return f"{name} names a class to instantiate"
            problem = _unsafe_value(value, name)
            if problem:
                return problem
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problem = _unsafe_value(value, f"{where}[{i}]")
            if problem:
                return problem
    elif isinstance(node, str) and ("${" in node or node == "???"):
        return f"{where}={node!r} is an interpolation or missing value"
    return None


def _check_sections(raw: dict[str, Any], path: Path) -> None:
    for section in ("dataset", "model", "poison", "train"):
        if not isinstance(raw.get(section), dict):
            raise CheckpointError(f"{path} has no {section} section; it is not a training run's config")
    if not (raw["dataset"].get("source") or raw["dataset"].get("name")):
        raise CheckpointError(f"{path}: dataset names no source")
    model = raw["model"]
    name = model.get("name")
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: model.name is missing")
    factory = MODELS.get(name)
    if factory is None:
        if not name.startswith("torchvision:"):
            raise CheckpointError(f"{path}: model.name={name} is not a known model ({sorted(MODELS)})")
        return
    allowed = set(inspect.signature(factory).parameters) - {"num_classes", "in_channels"}
    extra = sorted(set(model) - allowed - {"name"})
    if extra:
        raise CheckpointError(f"{path}: model {name} takes no argument {', '.join(extra)} (it takes "
                              f"{', '.join(sorted(allowed)) or 'none'})")


# --------------------------------------------------------------------------------------------- trained runs


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
    kind = _summary_kind(summary)
    if kind in ("unlearn", "heal"):
        raise CheckpointError(f"train_run={path} holds {KIND_WORDS[kind]}, not a training run; give the folder "
                              "train.py printed")
    cfg = read_run_config(run_dir / CONFIG)
    plan = read_plan(run_dir / PLAN)
    state = load_tensors(run_dir / WEIGHTS)
    images = load_tensors(run_dir / POISON_IMAGES).get("images") if (run_dir / POISON_IMAGES).is_file() else None
    return TrainedRun(run_dir, cfg, plan, state, summary, images)


# --------------------------------------------------------------------------------------------- run identity


@dataclass(frozen=True)
class RunIdentity:
    """What a run folder holds: the kind of run and its config hash (None when it cannot be known)."""

    kind: str
    config_hash: str | None


def _summary_kind(summary: Mapping[str, Any]) -> str:
    if "healed_weights" in summary:
        return "heal"
    if "method" in summary and "train_run" in summary:
        return "unlearn"
    if "train_seconds" in summary and "steps" in summary:
        return "train"
    return "unknown"


def identify_run(run_dir: Path) -> RunIdentity | None:
    """The run a folder holds (marker, else summary, else config.yaml), or None for a folder without one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any((run_dir / name).exists() for name in RUN_FILES):
        return None
    marker = _read_marker(run_dir / MARKER)
    if marker is not None:
        return marker
    summary = read_summary(run_dir)
    if summary is not None:
        h = summary.get("config_hash")
        return RunIdentity(_summary_kind(summary), h if isinstance(h, str) else None)
    if (run_dir / CONFIG).is_file():  # an unfinished training run written before run.json existed
        try:
            return RunIdentity("train", identity_hash(read_run_config(run_dir / CONFIG)))
        except CheckpointError:
            return RunIdentity("train", None)
    if (run_dir / CHECKPOINTS).exists():
        return RunIdentity("train", None)
    return RunIdentity("unknown", None)


def _read_marker(path: Path) -> RunIdentity | None:
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except CheckpointError:
        return RunIdentity("unknown", None)
    if not isinstance(raw, dict) or raw.get("kind") not in KIND_WORDS or not isinstance(raw.get("config_hash"), str):
        return RunIdentity("unknown", None)
    return RunIdentity(raw["kind"], raw["config_hash"])


def check_out_dir(run_dir: Path, kind: str, config_hash: str, force: bool) -> bool:
    """May a run of ``kind``/``config_hash`` use ``run_dir``? Returns True when it must start from scratch there.

    A folder holding a run of another kind is refused (force or not); one holding the same kind with
    another (or an unknown) config is refused unless ``force``, which means: start from scratch.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"out_dir={run_dir} is a file, not a folder; choose another out_dir")
    found = identify_run(run_dir)
    if found is None:
        return bool(force)
    if found.kind != kind:
        raise ConfigError(f"out_dir={run_dir} holds {KIND_WORDS[found.kind]}; a {kind} run never writes over "
                          "another kind of run: choose another out_dir")
    if found.config_hash != config_hash and not force:
        theirs = f"config {found.config_hash}" if found.config_hash else "an unknown config"
        raise ConfigError(f"out_dir={run_dir} holds {KIND_WORDS[kind]} of {theirs}, not of this config "
                          f"({config_hash}); choose another out_dir, or add force=true to start over there "
                          "from scratch (its results and checkpoints are deleted)")
    return bool(force)


def claim_run_dir(run_dir: Path, kind: str, config_hash: str, fresh: bool) -> None:
    """Create the folder and mark it as this run's; ``fresh`` first deletes what an earlier run left there.

    The summary goes first, so an interruption mid-way never leaves a finished-looking run; checkpoints
    are renamed away before deletion, so a resume never sees half of them.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(run_dir, exc) from exc
    if fresh:
        (run_dir / SUMMARY).unlink(missing_ok=True)
        (run_dir / MARKER).unlink(missing_ok=True)
        ckpts = run_dir / CHECKPOINTS
        if ckpts.exists():
            trash = run_dir / f".{CHECKPOINTS}.deleted-{uuid.uuid4().hex[:8]}"
            os.replace(ckpts, trash)
            shutil.rmtree(trash, ignore_errors=True)
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_file():
                path.unlink()
    atomic_write_json(run_dir / MARKER, {"kind": kind, "config_hash": config_hash})


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of atomic writes a killed process left (``.<name>.<random>.tmp``).

    Call only while holding the folder's run lock, so no live writer's temp file is taken.
    """
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
        elif path.name.startswith(f".{CHECKPOINTS}.deleted-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder: a second command on the same folder waits, then finds the result.

    The key is the folder's resolved path, so every spelling of one folder (``a/../b``, a symlink) takes the same
    lock. The lock file lives in the cache (``<cache>/locks``), so a refused or failed command leaves nothing in
    the run folder's parent; where the file system has no locks, commands run unlocked.
    """
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:32]
    path = cache_dir() / "locks" / f"{key}.lock"
    lock = FileLock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("another process is using %s; waiting for it to finish", run_dir)
            lock.acquire()
    except OSError as exc:  # an unwritable cache, ENOLCK on a network file system
        log.warning("cannot lock %s (%s); going on without a lock", run_dir, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()
