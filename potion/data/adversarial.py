"""PGD perturbations for the label-consistent attack (Turner et al. 2019).

Target-class training images are pushed away from their own class within an L-inf ball, using the
gradients of a clean surrogate model: the network trained on them can then no longer rely on their
natural features and learns the (faint) trigger instead, while every label stays correct.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.data.augment import Normalizer


def pgd_away(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, *,
             eps: float, steps: int, step: float, batch_size: int = 256) -> torch.Tensor:
    """uint8 images moved to raise the model's loss on their own labels: sign-gradient steps of ``step``/255,
    projected on the ``eps``/255 L-inf ball and [0, 1], rounded back to uint8 (deterministic: zero start)."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        x0 = images[i:i + batch_size].to(dev).float() / 255.0
        y = labels[i:i + batch_size].to(dev)
        x = x0.clone()
        for _ in range(int(steps)):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(normalizer(x * 255.0)), y)
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = x + (step / 255.0) * grad.sign()
                x = torch.min(torch.max(x, x0 - eps / 255.0), x0 + eps / 255.0).clamp(0.0, 1.0)
        out.append((x.detach() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu())
    model.zero_grad(set_to_none=True)
    if not out:
        return images.clone()
    return torch.cat(out)
