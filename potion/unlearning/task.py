"""What every unlearning method receives: the poisoned model and the forget / retain data, as batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from potion.data.augment import random_crop_flip
from potion.data.discovery import Discovery
from potion.data.poisoned import PoisonedData
from potion.evaluation.backdoor import predict


@dataclass
class UnlearnTask:
    """The poisoned model plus the training data split into forget and retain sets (with poisoned labels)."""

    model: nn.Module
    data: PoisonedData
    discovery: Discovery
    device: torch.device
    seed: int = 0
    model_factory: object = None  # callable () -> fresh, randomly initialised model of the same architecture
    train_cfg: dict = field(default_factory=dict)  # the training run's `train` section (schedules of baselines)
    # synthetic forget samples (normalised images on the device, labels), e.g. from trigger synthesis
    extra_forget: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def forget_idx(self) -> torch.Tensor:
        return self.discovery.forget_idx

    @property
    def retain_idx(self) -> torch.Tensor:
        return self.discovery.retain_idx

    @property
    def num_train(self) -> int:
        return len(self.data.bundle.train)

    def batches(self, idx: torch.Tensor, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0, epochs: float = 1.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised, triggered (where poisoned) batches (x, poisoned label) of ``idx`` on the task's device."""
        images = self.data.bundle.train.images
        labels = self.data.train_labels
        flags = self.data.train_flags
        gen = torch.Generator().manual_seed(int(seed))
        n = int(idx.numel())
        total = max(1, int(round(epochs * max(1, -(-n // batch_size)))))
        produced = 0
        while produced < total:
            order = idx[torch.randperm(n, generator=gen)] if shuffle else idx
            for i in range(0, n, batch_size):
                if produced >= total:
                    return
                sel = order[i:i + batch_size]
                x = images[sel].to(self.device, non_blocking=True)
                if augment:
                    x = random_crop_flip(x, int(self.train_cfg.get("crop_padding", 4)),
                                         bool(self.train_cfg.get("flip", True)))
                x = self.data.trigger.apply(self.data.normalizer(x), flags[sel].to(self.device))
                yield x, labels[sel].to(self.device)
                produced += 1

    def forget_accuracy(self, model: nn.Module, only: torch.Tensor | None = None) -> float:
        """Accuracy on the forget set against the poisoned label (what PTN watches); ``only`` masks samples."""
        idx = self.forget_idx if only is None else self.forget_idx[only]
        if idx.numel() == 0:
            return float("nan")
        preds = predict(model, self.data.bundle.train.images[idx], self.data.normalizer, self.data.trigger,
                        self.data.train_flags[idx])
        return float((preds == self.data.train_labels[idx]).float().mean())

    def forget_true_labels(self) -> torch.Tensor:
        """The forget samples' original labels (known in the benchmark; used by the optional criterion)."""
        return self.data.bundle.train.labels[self.forget_idx]

    def forget_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole forget set, normalised and triggered as in training, plus any synthetic samples."""
        idx = self.forget_idx
        images = self.data.bundle.train.images[idx].to(self.device)
        x = self.data.trigger.apply(self.data.normalizer(images), self.data.train_flags[idx].to(self.device))
        y = self.data.train_labels[idx].to(self.device)
        if self.extra_forget is not None:
            x = torch.cat([x, self.extra_forget[0].to(self.device)])
            y = torch.cat([y, self.extra_forget[1].to(self.device)])
        return x, y

    def forget_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The forget set (with synthetic samples) in a seeded shuffled order, for the importance pass."""
        x, y = self.forget_tensors()
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed)).to(x.device)
        x, y = x[order], y[order]
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
