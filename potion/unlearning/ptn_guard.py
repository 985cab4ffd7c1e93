"""PTN's guard: the search never keeps a step that costs too much of what the model classifies right.

Why: PTN dampens until the discovered samples leave the attacker's label. When they carry no working trigger
(an attack that did not implant, a file discovered by mistake) the model holds them by memorising each one,
and dampening until they are forgotten costs the whole model (the quickstart's digits with a WaNet warp that
never implanted: acc_drop 50 from one discovered sample). The guard counts how many seeded retain images (as
stored) that the undampened model classifies as their label a step gets wrong; above
``method.ptn.max_acc_loss`` % of them the search steps back to the last step within it (by bisection: each
step dampens more than the one before), keeps that model and says so. The first step is always kept.
Undiscovered poison among them (a defender cannot leave it out) is a share of about n_p / N of the images
and leaving its label is what healing should do; images the model already got wrong do not count (their
predictions move freely under dampening and say little about accuracy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from potion.data.augment import Normalizer
from potion.evaluation import metrics
from potion.evaluation.backdoor import predict
from potion.unlearning.ptn import PTNResult
from potion.unlearning.ptn_candidates import Candidate
from potion.unlearning.task import DataMeter, UnlearnTask

log = logging.getLogger("potion.ptn")


@dataclass
class AccuracyLoss:
    """Percent of fixed clean retain images, classified as their label by the undampened model, that a model
    gets wrong."""

    images: torch.Tensor  # uint8 retain images as stored (undiscovered poison among them, as a defender has it) ...
    labels: torch.Tensor  # ... and their given labels, kept where the undampened model is right
    normalizer: Normalizer
    meter: DataMeter = field(default_factory=DataMeter)  # the task's: every evaluation streams these images

    @classmethod
    def of(cls, task: UnlearnTask, samples: int, seed: int) -> AccuracyLoss:
        """Up to ``samples`` seeded retain images that ``task.model`` (undampened) gets right."""
        gen = torch.Generator().manual_seed(int(seed))
        pick = task.retain_idx[torch.randperm(task.retain_idx.numel(), generator=gen)[:int(samples)]]
        images, labels = task.train.images[pick], task.train.labels[pick]
        right = predict(task.model, images, task.train.normalizer) == labels
        task.meter.samples += int(pick.numel())
        return cls(images[right], labels[right], task.train.normalizer, task.meter)

    def __call__(self, model: nn.Module) -> float:
        if self.labels.numel() == 0:
            return 0.0
        self.meter.samples += int(self.labels.numel())
        return 100.0 * (1.0 - metrics.accuracy(predict(model, self.images, self.normalizer), self.labels))


def guard_step(result: PTNResult, limit: float, loss: Callable[[nn.Module], float], model: nn.Module,
               redo: Callable[[int], Candidate]) -> tuple[PTNResult, dict[str, float]]:
    """``result`` if its step loses at most ``limit`` % of the guard's images; otherwise the last step within
    it, found by bisection below the chosen one (``redo(k)`` dampens ``model`` at step k from the originals
    and measures it). The model is left at the step returned."""
    now = loss(model)
    info = {"ptn_acc_loss": now, "ptn_guarded": 0.0}
    if now <= limit or result.chosen.step == 0:
        return result, info
    first = result.chosen.step
    lo, hi, at, kept_loss = 0, first, None, None  # hi: a step known to lose too much; lo: kept at worst
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = redo(mid)
        value = loss(model)
        at = mid
        if value <= limit:
            lo, kept, kept_loss = mid, cand, value
        else:
            hi = mid
    if at != lo or kept_loss is None:
        kept = redo(lo)
        kept_loss = loss(model)
    log.warning("PTN guard: step k=%d gets %.1f%% of the clean retain images the model classified right wrong "
                "(more than method.ptn.max_acc_loss=%s); kept step k=%d (%.1f%%, forget_acc %.3f, threshold %.3f). "
                "The discovered samples may carry no working trigger (the model memorised them one by one): "
                "check them, or raise method.ptn.max_acc_loss", first, now, limit, lo, kept_loss,
                kept.forget_acc, result.threshold)
    info = {"ptn_acc_loss": kept_loss, "ptn_guarded": 1.0, "ptn_guard_from_step": float(first)}
    return replace(result, reached=kept.qualifies(result.threshold), chosen=kept), info
