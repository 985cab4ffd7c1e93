"""REM's added units for any network: residual side paths attached by forward hooks at chosen *taps*.

How the added units are built, for any model (the paper adds channels to the conv layers; the authors' ResNet-9
has them at its four stage outputs; a general channel-widening rewrite of arbitrary networks is not practical,
so the same capacity is attached as a residual side path): at each *tap* -- the output ``h`` of a chosen module
-- the added units are ``a = relu(down(h))`` (a 3x3 conv for [B, C, H, W] maps, a linear layer over the last
dimension for [B, D] or [B, N, D] tokens) with ``round(width * C)`` units, masked per sample, and written back
as ``h + up(mask * a)`` (1x1 conv / linear, no bias), so they feed every later layer as the widened channels do
in the paper. With the masks off the side paths contribute nothing, and dropping them (the forward hooks are
removed) leaves the original module tree untouched. Taps are chosen automatically: the model's *spine* (its
children, with ``nn.Sequential`` containers flattened) is run once; consecutive spine modules with the same
output shape form a stage, a stage counts when it holds parameters, its last module is the stage's output, the
classifier (the last spine module) never counts, and ``taps`` stages are picked evenly from first to last. On
ResNet-9 that is exactly the authors' four places (after the first conv block, the first residual stage, the
second residual stage and the last conv block); ``tap_modules`` names modules explicitly instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.core.errors import ConfigError

# --------------------------------------------------------------------------------------- taps


@dataclass(frozen=True)
class Tap:
    """One place the added units attach: a module name and the shape of its output (batch dimension left out)."""

    name: str
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        """The feature dimension: dim 1 of a [B, C, H, W] map, the last dim of [B, D] and [B, N, D]."""
        return self.shape[0] if len(self.shape) == 3 else self.shape[-1]


def spine(model: nn.Module, prefix: str = "") -> list[str]:
    """The model's children in order, ``nn.Sequential`` containers replaced by their own children."""
    names = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        names += spine(child, f"{full}.") if isinstance(child, nn.Sequential) else [full]
    return names


@torch.no_grad()
def probe(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, tuple[int, ...] | None]], dict[str, int]]:
    """Run ``x`` once (eval mode): every module's output shape in call order, and how often each was called."""
    calls: list[tuple[str, tuple[int, ...] | None]] = []
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls.append((name, tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None))
            counts[name] = counts.get(name, 0) + 1
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        model(x)  # shapes only: no autocast needed
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls, counts


def _usable(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and 1 <= len(shape) <= 3


def stage_outputs(model: nn.Module, calls: list[tuple[str, tuple[int, ...] | None]], counts: dict[str, int]
                  ) -> list[Tap]:
    """The last module of every parameterised run of equal-shaped spine outputs, classifier excluded."""
    on_spine = set(spine(model))
    seq = [(n, s) for n, s in calls if n in on_spine and counts[n] == 1][:-1]  # the last one is the classifier
    modules = dict(model.named_modules())
    stages: list[Tap] = []
    run_has_params = False
    for i, (name, shape) in enumerate(seq):
        run_has_params |= any(True for _ in modules[name].parameters())
        ends = i + 1 == len(seq) or seq[i + 1][1] != shape
        if ends:
            if run_has_params and _usable(shape):
                stages.append(Tap(name, shape))  # type: ignore[arg-type]
            run_has_params = False
    return stages


def evenly(items: list[Tap], k: int) -> list[Tap]:
    """``k`` items spread from the first to the last (all of them when there are no more than ``k``)."""
    if len(items) <= k:
        return items
    if k == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def choose_taps(model: nn.Module, x: torch.Tensor, count: int, names: tuple[str, ...] | None) -> list[Tap]:
    """The named modules (checked), else ``count`` stage outputs spread over the network."""
    calls, counts = probe(model, x)
    if names is None:
        taps = evenly(stage_outputs(model, calls, counts), count)
        if not taps:
            raise ConfigError("method.taps: found no stage output to attach REM's added units to; "
                              "name modules with method.tap_modules")
        return taps
    if len(set(names)) != len(names):
        raise ConfigError("method.tap_modules: a module is named twice")
    shapes = dict(calls)
    known = dict(model.named_modules())
    taps = []
    for name in names:
        if name not in known:
            raise ConfigError(f"method.tap_modules: {name!r} is not a module of the model")
        if counts.get(name) != 1 or not _usable(shapes.get(name)):
            raise ConfigError(f"method.tap_modules: {name!r} must run once per forward pass and output a "
                              "[B, D], [B, N, D] or [B, C, H, W] tensor")
        taps.append(Tap(name, shapes[name]))  # type: ignore[arg-type]
    return taps


# --------------------------------------------------------------------------------------- added units


class AddedUnits(nn.Module):
    """``units`` neurons read from a tap's output and written back to it, gated per sample by a binary mask."""

    def __init__(self, tap: Tap, units: int) -> None:
        super().__init__()
        self.spatial = len(tap.shape) == 3
        c = tap.channels
        if self.spatial:
            self.down: nn.Module = nn.Conv2d(c, units, 3, padding=1)
            self.up: nn.Module = nn.Conv2d(units, c, 1, bias=False)
        else:
            self.down = nn.Linear(c, units)
            self.up = nn.Linear(units, c, bias=False)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The side path's contribution ``up(mask * relu(down(h)))`` (``mask``: [B, units], 0/1)."""
        a = F.relu(self.down(h))
        shape = (mask.shape[0], mask.shape[1], 1, 1) if self.spatial else \
            (mask.shape[0],) + (1,) * (h.dim() - 2) + (mask.shape[1],)
        return self.up(a * mask.view(shape).to(a.dtype))


class Redirection:
    """Forward hooks that add the units' contribution at the taps while masks are set (redirect mode).

    Without masks (drop mode) the hooks return nothing and the model computes exactly what it did before.
    """

    def __init__(self, model: nn.Module, taps: list[Tap], units: nn.ModuleList) -> None:
        self.units = units
        self.masks: list[torch.Tensor] | None = None
        modules = dict(model.named_modules())
        self.handles = [modules[t.name].register_forward_hook(self._hook(j)) for j, t in enumerate(taps)]

    def _hook(self, j: int):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if self.masks is None:
                return None
            return output + self.units[j](output, self.masks[j])
        return hook

    @contextmanager
    def on(self, masks: list[torch.Tensor]) -> Iterator[None]:
        """Redirect mode for the forward passes inside the block."""
        self.masks = masks
        try:
            yield
        finally:
            self.masks = None

    def remove(self) -> None:
        """Detach the hooks for good: the model is its plain self again."""
        for h in self.handles:
            h.remove()
        self.handles = []
