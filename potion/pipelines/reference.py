"""The clean reference model: the same data set, model, recipe and seed, trained with no poison at all.

It is the ceiling ``healed_attainable`` measures against (image-wide triggers degrade images, so a clean model
misreads many triggered inputs too) and the surrogate of the label-consistent attack. Every attack on one recipe
shares it: it lives in runs/train/<name>-<hash> as any training run, or as ``reference-<hash>`` beside an explicit
``out_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from potion.config.compose import identity_hash

NO_POISON = {"count": 0, "fraction": None, "target": 0, "exclude_target": False, "mapping": "all_to_one",
             "trigger": {"kind": "none"}}
# per-run settings that say where and how a run is kept, not what it is
RUN_PLACE_KEYS = {"out_dir": None, "force": False, "resume": True}


def no_poison_block(train_cfg: Any) -> dict[str, Any]:
    """The poison block of a clean run: NO_POISON with the run's poison seed."""
    poison = train_cfg.get("poison") or {}
    return {**NO_POISON, "trigger": dict(NO_POISON["trigger"]), "seed": poison.get("seed", train_cfg.get("seed", 0))}


def canonical_clean(train_cfg: DictConfig) -> DictConfig:
    """A clean training config (``trigger.kind=none``) in its one canonical form.

    With no trigger nothing is poisoned, so the block's other settings (an experiment's ``poison.count: 500``,
    a target, a mapping) change nothing; they are reset to NO_POISON's values. ``python train.py poison=none``
    under any experiment is then the same run (same hash, same folder, trained once) as the clean reference of
    that recipe, and its saved config does not claim 500 poisoned samples. Poisoned configs are returned as is.
    """
    if not is_reference(train_cfg):
        return train_cfg
    cfg = train_cfg.copy()
    with open_dict(cfg):
        cfg.poison = no_poison_block(cfg)
        if "trigger_in_files" in cfg.get("train", {}):
            cfg.train.trigger_in_files = False  # no trigger: where it would be written changes nothing
    return cfg


def reference_config(train_cfg: Any) -> DictConfig:
    """The training config of the clean reference for a (poisoned) training config."""
    d = OmegaConf.to_container(train_cfg, resolve=True) if isinstance(train_cfg, DictConfig) else dict(train_cfg)
    d["poison"] = no_poison_block(d)
    out_dir = d.get("out_dir")
    d.update(RUN_PLACE_KEYS)
    ref = canonical_clean(OmegaConf.create(d))
    if out_dir:
        ref.out_dir = str(Path(str(out_dir)).parent / f"reference-{identity_hash(ref)}")
    return ref


def is_reference(train_cfg: Any) -> bool:
    """Whether a training config is itself a clean reference (no trigger)."""
    poison = train_cfg.get("poison") or {}
    trigger = poison.get("trigger") or {}
    return str(trigger.get("kind", "patch")) == "none"
