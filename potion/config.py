"""Config helpers: plain containers, content hashes and the static validation rules of every config value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from potion.errors import ConfigError
from potion.io import sha256_json

# Keys that do not change what a run computes: excluded from a run's identity.
NON_IDENTITY_KEYS = ("logger", "resume", "force", "out_dir", "hydra", "print_table")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict from a DictConfig or mapping."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def identity_hash(cfg: Any, extra_exclude: tuple[str, ...] = ()) -> str:
    """Content hash of the settings that determine a run's result (12 hex chars)."""
    d = to_dict(cfg)
    for key in NON_IDENTITY_KEYS + extra_exclude:
        d.pop(key, None)
    return sha256_json(d)[:12]


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def number(cfg: Mapping[str, Any], key: str, path: str, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False, allow_none: bool = False) -> Any:
    """Fetch ``cfg[key]`` and check its type and range; the error names ``path`` and what is allowed."""
    value = cfg.get(key)
    if value is None:
        check(allow_none, f"{path}: required (got null)")
        return None
    if integer:
        check(isinstance(value, int) and not isinstance(value, bool), f"{path}={value!r}: must be an integer")
    else:
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)),
              f"{path}={value!r}: must be a finite number")
    lo_txt = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    hi_txt = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
    if lo is not None:
        check(value > lo if lo_open else value >= lo, f"{path}={value}: must be {allowed}")
    if hi is not None:
        check(value < hi if hi_open else value <= hi, f"{path}={value}: must be {allowed}")
    return value


def validate_train_config(cfg: Any) -> None:
    """Every training value a user can get wrong, checked before any data is read."""
    d = to_dict(cfg)
    number(d, "seed", "seed", lo=0, integer=True)
    t = d["train"]
    number(t, "batch_size", "train.batch_size", lo=1, integer=True)
    number(t, "iterations", "train.iterations", lo=1, integer=True, allow_none=True)
    if t.get("iterations") is None:
        number(t, "epochs", "train.epochs", lo=0, lo_open=True)
    number(t, "lr", "train.lr", lo=0, lo_open=True)
    number(t, "momentum", "train.momentum", lo=0, hi=1, hi_open=True)
    number(t, "weight_decay", "train.weight_decay", lo=0)
    number(t, "warmup", "train.warmup", lo=0, hi=1, hi_open=True)
    number(t, "label_smoothing", "train.label_smoothing", lo=0, hi=1, hi_open=True)
    number(t, "crop_padding", "train.crop_padding", lo=0, integer=True)
    number(t, "checkpoint_every_n_steps", "train.checkpoint_every_n_steps", lo=1, integer=True, allow_none=True)
    p = d["poison"]
    check((p.get("count") is None) != (p.get("fraction") is None),
          "poison: set exactly one of poison.count (e.g. 500) or poison.fraction (e.g. 0.01); null the other")
    if p.get("fraction") is not None:
        number(p, "fraction", "poison.fraction", lo=0, hi=1, lo_open=True, hi_open=True)
    else:
        number(p, "count", "poison.count", lo=1, integer=True)
    number(p, "target", "poison.target", lo=0, integer=True)
    validate_model_config(d["model"])
    tr = d["trainer"]
    check(tr.get("accelerator") in ("cpu", "gpu", "cuda", "auto", "mps"),
          f"trainer.accelerator={tr.get('accelerator')}: choose cpu, gpu or auto")


PTN_CRITERIA = ("all", "exclude_true_target", "exclude_natural_target")


def validate_unlearn_config(cfg: Any) -> None:
    """Every unlearning value checkable without the training run, checked before the run is loaded.

    Values that need the run (``discovery.count`` against n_p) are checked where the run is known.
    """
    d = to_dict(cfg)
    number(d, "seed", "seed", lo=0, integer=True)
    if "eval_batch_size" in d:
        number(d, "eval_batch_size", "eval_batch_size", lo=1, integer=True)
    disc = d.get("discovery") or {}
    if disc.get("count") is not None:
        number(disc, "count", "discovery.count", lo=1, integer=True)
    else:
        check(disc.get("share") is not None,
              "discovery: set discovery.share (in (0, 1]) or discovery.count (in [1, n_p])")
        number(disc, "share", "discovery.share", lo=0, hi=1, lo_open=True)
    m = d.get("method") or {}
    imp = m.get("importance")
    if isinstance(imp, Mapping):
        if "batch_size" in imp:
            number(imp, "batch_size", "method.importance.batch_size", lo=1, integer=True)
        number(imp, "retain_samples", "method.importance.retain_samples", lo=1, integer=True, allow_none=True)
    ptn = m.get("ptn")
    if isinstance(ptn, Mapping):
        rules = {"rho": {"lo": 0, "hi": 1}, "s_step": {"lo": 1, "lo_open": True},
                 "s_start": {"lo": 0, "lo_open": True, "allow_none": True},
                 "max_steps": {"lo": 1, "integer": True}, "fixed_step": {"lo": 0, "integer": True, "allow_none": True}}
        for key, rule in rules.items():
            if key in ptn:
                number(ptn, key, f"method.ptn.{key}", **rule)
        crit = ptn.get("criterion", "all")
        check(crit in PTN_CRITERIA, f"method.ptn.criterion={crit}: choose one of {list(PTN_CRITERIA)}")
    if m.get("name") == "ssd":
        for key in ("alpha", "lam"):
            if key in m:
                number(m, key, f"method.{key}", lo=0, lo_open=True)


def validate_model_config(m: Mapping[str, Any]) -> None:
    """Model values: width/depth/factor ranges (names are checked by the model registry)."""
    if "width" in m:
        number(m, "width", "model.width", lo=0, lo_open=True)
    if "widen_factor" in m:
        number(m, "widen_factor", "model.widen_factor", lo=1, integer=True)
    if "depth" in m:
        number(m, "depth", "model.depth", lo=10, integer=True)


def model_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the configured model (everything but its name)."""
    return {k: v for k, v in dict(model_cfg).items() if k != "name"}
