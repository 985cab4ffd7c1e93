"""Model evaluation on clean and triggered images: predictions in, metric dicts out (formulas in metrics.py)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from potion.data.augment import Normalizer
from potion.data.poison import Trigger
from potion.evaluation import metrics


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (the GPU path), nothing on CPU (exact, reproducible numbers)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-free models)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, trigger: Trigger | None = None,
            which: torch.Tensor | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes for uint8 images, optionally with the trigger pasted (on rows where ``which``)."""
    return logits_of(model, images, normalizer, trigger, which, batch_size).argmax(1)


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, trigger: Trigger | None = None,
              which: torch.Tensor | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = normalizer(images[i:i + batch_size].to(dev, non_blocking=True))
            if trigger is not None:
                w = None if which is None else which[i:i + batch_size]
                x = trigger.apply(x, w)
            with autocast_for(dev):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


@torch.no_grad()
def evaluate_backdoor(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer,
                      trigger: Trigger, target: int | torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """clean_acc, poison_acc and asr (method.md §3) on a labelled split.

    ``target``: the attack's class, or the attacker's label per image (``PoisonPlan.wanted``; all-to-all).
    """
    clean = predict(model, images, normalizer, batch_size=batch_size)
    triggered = predict(model, images, normalizer, trigger, batch_size=batch_size)
    return {
        "clean_acc": metrics.accuracy(clean, labels),
        "poison_acc": metrics.accuracy(triggered, labels),
        "asr": metrics.attack_success_rate(triggered, labels, target),
    }
