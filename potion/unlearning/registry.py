"""Methods register by name: ``@register("potion")`` on a function ``(task, **args) -> MethodOutput``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from potion.errors import ConfigError


@dataclass
class MethodOutput:
    """The unlearned model, scalar diagnostics (logged as metrics), wall-clock split and optional trajectory."""

    model: nn.Module
    diagnostics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    trajectory: list[dict[str, Any]] = field(default_factory=list)


METHODS: dict[str, Callable[..., MethodOutput]] = {}


def register(name: str) -> Callable[[Callable[..., MethodOutput]], Callable[..., MethodOutput]]:
    """Add a method to the registry under ``name``."""

    def deco(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Callable[..., MethodOutput]:
    """The registered method, or a ConfigError listing the valid names."""
    load_builtin_methods()
    if name not in METHODS:
        raise ConfigError(f"method.name={name}: unknown method; choose one of {sorted(METHODS)}")
    return METHODS[name]


def run_timed(method_fn: Callable[..., MethodOutput], task: Any, args: dict[str, Any]) -> tuple[MethodOutput, float]:
    """Run a method and measure its wall-clock seconds (GPU work synchronised before and after)."""
    import time

    import torch

    cuda = getattr(task, "device", None) is not None and task.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = method_fn(task, **args)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def load_builtin_methods() -> None:
    """Import the modules whose decorators fill the registry."""
    from potion.unlearning import iterative, rem, ssd_family, training_based  # noqa: F401
