"""Methods register by name with what they can do: ``@register("potion", ptn=True, heal_ok=True, dampens=True)``.

A method is a function ``(task, **args) -> MethodOutput`` whose keyword arguments are its schema class's fields
(:mod:`potion.config.schema`; a test checks that they agree). Callers ask the registry what a method can do
instead of keeping lists of names. This module is the bottom of the method layer (no method module, no torch):
import :mod:`potion.unlearning.methods` to have every built-in method registered, or ask
:func:`declared_names` (read from the modules' source) where torch must not be imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from potion.core.declared import declared
from potion.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


@dataclass
class MethodOutput:
    """The unlearned model, scalar diagnostics (logged as metrics), wall-clock split and optional trajectory."""

    model: nn.Module
    diagnostics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    forget_idx: torch.Tensor | None = None  # the forget set the method ended with, when it grew it (iterative)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method and its capabilities."""

    name: str
    fn: Callable[..., MethodOutput]
    ptn: bool = False  # one PTN search over one importance pair: the PTN sweeper may split it into jobs
    heal_ok: bool = False  # needs only the model and the data, no training recipe: potion.heal can run it
    changes_model: bool = True  # False: the poisoned model comes back as it is (the reference row)
    dampens: bool = False  # only dampens weights (SSD family): never enlarges one; uses the importance cache
    iterative: bool = False  # ranks suspects and grows the forget set with them
    trains: bool = False  # SGD on the training data with the training run's settings as fallbacks


METHODS: dict[str, MethodInfo] = {}


def register(name: str, **capabilities: bool) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Add a method to the registry under ``name`` with its capabilities (the fields of :class:`MethodInfo`)."""

    def deco(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodInfo(name, fn, **capabilities)
        return fn

    return deco


def method_info(name: str) -> MethodInfo:
    """The registered method called ``name``, or a ConfigError listing the valid names."""
    if name not in METHODS:
        raise ConfigError(f"method.name={name}: unknown method; choose one of {sorted(METHODS)}")
    return METHODS[name]


def get_method(name: str) -> Callable[..., MethodOutput]:
    """The registered method's function."""
    return method_info(name).fn


def method_names(**capabilities: bool) -> list[str]:
    """The registered names whose capabilities have the given values: ``method_names(ptn=True)``."""
    return sorted(n for n, info in METHODS.items() if all(getattr(info, k) == v for k, v in capabilities.items()))


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work, so a wall-clock split counts the work and not just its launch."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def declared_names(**capabilities: bool) -> list[str]:
    """:func:`method_names` without importing a method module (no torch): read from the ``@register`` lines."""
    info = {f.name: f.default for f in fields(MethodInfo) if f.name not in ("name", "fn")}
    return sorted(n for n, d in declared("potion.unlearning", "register").items()
                  if all({**info, **d.options}[k] == v for k, v in capabilities.items()))


def run_timed(method_fn: Callable[..., MethodOutput], task: Any, args: dict[str, Any]) -> tuple[MethodOutput, float]:
    """Run a method and measure its wall-clock seconds (GPU work synchronised before and after)."""
    device = getattr(task, "device", None)
    sync(device)
    t0 = time.perf_counter()
    out = method_fn(task, **args)
    sync(device)
    return out, time.perf_counter() - t0
