"""No trigger: the clean reference model of a data set, model and recipe (a training run with no poison)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potion.data.triggers.base import TriggerFields, trigger_kind


class NoTrigger:
    """Nothing is pasted."""

    def apply(self, x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        return x


@trigger_kind("none", title="no poison")
@dataclass(frozen=True)
class NoPoison(TriggerFields):
    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> NoTrigger:
        return NoTrigger()
