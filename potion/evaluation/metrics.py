"""Every metric formula of method.md §3, once. Inputs are predictions and labels; outputs are floats.

Accuracies are fractions in [0, 1]; ``healed`` and ``acc_drop`` are percentages / percentage points.
"""

from __future__ import annotations

import math

import torch


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to the labels (NaN for an empty set)."""
    if labels.numel() == 0:
        return float("nan")
    return float((preds.view(-1) == labels.view(-1)).float().mean())


def attack_success_rate(triggered_preds: torch.Tensor, true_labels: torch.Tensor, target: int | torch.Tensor
                        ) -> float:
    """Share of triggered images whose true class is not the attacker's label that are predicted as it.

    ``target``: the class of an all-to-one attack, or the attacker's label per image (all-to-all: y + 1 mod C).
    """
    labels = true_labels.view(-1)
    wanted = torch.full_like(labels, int(target)) if not torch.is_tensor(target) else target.view(-1)
    keep = labels != wanted
    if int(keep.sum()) == 0:
        return float("nan")
    return float((triggered_preds.view(-1)[keep] == wanted[keep]).float().mean())


def healed(poison_acc_after: float, poison_acc_before: float, clean_acc_before: float) -> float:
    """100 * share of the trigger-induced accuracy gap that unlearning closed (project choice, method.md §3)."""
    gap = clean_acc_before - poison_acc_before
    if gap <= 0:
        return float("nan")
    return 100.0 * (poison_acc_after - poison_acc_before) / gap


def healed_attainable(poison_acc_after: float, poison_acc_before: float, poison_acc_reference: float) -> float:
    """100 * share of the gap to what a clean model of the same recipe achieves on triggered inputs.

    Image-wide triggers degrade the image itself, so even a model that never saw poison misclassifies
    many triggered inputs and ``healed`` (measured against clean accuracy) caps below 100; this one does not.
    """
    gap = poison_acc_reference - poison_acc_before
    if gap <= 0:
        return float("nan")
    return 100.0 * (poison_acc_after - poison_acc_before) / gap


def acc_drop(clean_acc_before: float, clean_acc_after: float) -> float:
    """Clean-accuracy loss in percentage points (negative = the model got better)."""
    return 100.0 * (clean_acc_before - clean_acc_after)


def finite_or_none(x: float) -> float | None:
    """JSON-friendly: NaN/inf become None."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
