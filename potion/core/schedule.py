"""Learning-rate schedule, step count and CPU thread count: plain helpers with no Lightning import.

Kept apart from ``potion.pipelines.lightning_module`` so unlearning and PTN sweep jobs (never training with Lightning)
start without importing it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable


def warmup_linear_decay(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` of the steps, then linear decay to 0 (method.md §2)."""
    warm = max(1, int(round(warmup * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


def total_steps_for(num_train: int, batch_size: int, iterations: int | None, epochs: float | None,
                    world_size: int = 1) -> int:
    """Optimizer steps: ``iterations`` if set, else ``epochs`` passes over the data."""
    if iterations:
        return int(iterations)
    per_epoch = math.ceil(num_train / world_size / batch_size)
    return max(1, int(round(float(epochs or 1) * per_epoch)))


def cpu_threads() -> int:
    """Threads torch should use on CPU: $POTION_THREADS or all cores."""
    return int(os.environ.get("POTION_THREADS", os.cpu_count() or 1))
