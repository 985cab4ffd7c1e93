"""Parameter importances from mini-batch gradients: the one estimator behind SSD, ASSD, LFSSD and Potion.

``loss`` picks what is differentiated per batch (method.md §4):
  - ``ce``:            cross-entropy against the given labels (SSD, ASSD);
  - ``logit_sqnorm``:  mean over samples of the squared L2 norm of the logits (LFSSD, label-free);
  - ``logit_norm``:    mean over samples of the plain L2 norm of the logits (Potion, outlier-resistant).
``power`` 2 accumulates squared gradients, 1 accumulates |gradient|. Sums are divided by the number of
batches. The model runs in eval mode, so batch-norm statistics stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.core.errors import ConfigError
from potion.core.progress import Progress
from potion.evaluation.backdoor import autocast_for

LOSSES = ("ce", "logit_sqnorm", "logit_norm")


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """The scalar a batch's gradient is taken of."""
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    if loss == "logit_sqnorm":
        return logits.pow(2).sum(1).mean()
    if loss == "logit_norm":
        return logits.norm(dim=1).mean()
    raise ConfigError(f"importance loss {loss!r}: choose one of {list(LOSSES)}")


def importance_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters importances are computed for and dampening may touch: every trainable one."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def compute_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, loss: str,
                       power: int, what: str = "importance pass", total: int | None = None) -> dict[str, torch.Tensor]:
    """Mean over batches of |grad|^power of ``loss`` for every trainable parameter (float32, model's device).

    The pass is the cost of the SSD family on a large retain set, so it reports progress
    (:mod:`potion.core.progress`): ``what`` names it, ``total`` (the number of batches, when known) gives the time left.
    """
    if loss not in LOSSES:
        raise ConfigError(f"importance loss {loss!r}: choose one of {list(LOSSES)}")
    if power not in (1, 2):
        raise ConfigError(f"importance power {power}: must be 1 (|grad|) or 2 (grad^2)")
    params = importance_parameters(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    was_training = model.training
    model.eval()
    n_batches = 0
    bar = Progress(what, total, "batches")
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            with autocast_for(x.device):
                logits = model(x)
            batch_loss(logits.float(), y, loss).backward()
            for n, p in params:
                if p.grad is not None:
                    g = p.grad.detach().float()
                    acc[n].add_(g.abs() if power == 1 else g.pow(2))
            n_batches += 1
            bar.advance()
        bar.finish()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n_batches == 0:
        raise ConfigError("importance: no batches (empty forget or retain set)")
    for t in acc.values():
        t.div_(n_batches)
    return acc
