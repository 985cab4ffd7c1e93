"""The attack catalogue: one module per trigger family, one registry entry per ``poison.trigger.kind``.

Each entry says what the attack is (its builder) and what callers need to know about it:
``clean_label`` (only target-class samples are poisoned and keep their label), ``image_wide`` (the
trigger touches the whole image, so there is no patch window to locate), ``noise_mode`` (the plan
also holds samples that get a random variant of the trigger and keep their label) and ``surrogate``
(poisoned images are first perturbed with a clean model's gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from potion.data.triggers.additive import build_ftrojan, build_sig
from potion.data.triggers.base import PixelSpace
from potion.data.triggers.corners import build_corners
from potion.data.triggers.wanet import build_wanet
from potion.data.triggers.weighted import build_blend, build_patch


class NoTrigger:
    """The clean reference: nothing is pasted (a training run with no poison)."""

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class AttackKind:
    """One trigger family and its capabilities."""

    name: str
    build: Callable[..., Any]
    pixel_space: bool
    clean_label: bool = False
    image_wide: bool = False
    noise_mode: bool = False
    surrogate: bool = False
    description: str = ""


KINDS: dict[str, AttackKind] = {k.name: k for k in (
    AttackKind("patch", build_patch, False, description="BadNets: a small patch at a fixed place"),
    AttackKind("blend", build_blend, False, image_wide=True, description="a fixed random image alpha-blended in"),
    AttackKind("sig", build_sig, True, clean_label=True, image_wide=True,
               description="clean-label horizontal sinusoid"),
    AttackKind("wanet", build_wanet, True, image_wide=True, noise_mode=True,
               description="a fixed smooth warp of the whole image (grid_sample)"),
    AttackKind("ftrojan", build_ftrojan, True, image_wide=True,
               description="a fixed bump of chosen DCT frequencies in the chroma channels"),
    AttackKind("label_consistent", build_corners, True, clean_label=True, surrogate=True,
               description="clean-label: PGD-hardened target images plus faint corner checkerboards"),
    AttackKind("none", lambda *a, **k: NoTrigger(), False, description="no trigger (clean reference model)"),
)}


def kind_of(name: str) -> AttackKind:
    """The registry entry (callers check the name first with :func:`potion.data.poison.validate_trigger`)."""
    return KINDS[name]


def build_trigger(spec: Any, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
                  ) -> Any:
    """The trigger function object (``.apply(x, which)``) of a validated spec for one data set's shape."""
    kind = kind_of(spec.kind)
    if kind.pixel_space:
        return kind.build(spec, channels, height, width, PixelSpace(mean, std))
    return kind.build(spec, channels, height, width, mean, std)
