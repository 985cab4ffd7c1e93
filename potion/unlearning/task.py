"""What every unlearning method receives: the model, the training set as a defender holds it, the discovered
samples and what is known of the attack. Nothing here holds the attack's answer key (see potion.data.defender)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from potion.data.augment import random_crop_flip
from potion.data.defender import TrainingView
from potion.data.discovery import Discovery
from potion.evaluation.backdoor import predict
from potion.unlearning.attack import AttackFacts


@dataclass
class DataMeter:
    """Training-set samples a method streamed (forward passes over stored images): its data cost, in passes when
    divided by the training-set size. Shared by every copy of a task, so sub-tasks (iterative rounds) add up."""

    samples: int = 0


@dataclass
class UnlearnTask:
    """The poisoned model plus the training set (as stored, labels as given) split into forget and retain sets."""

    model: nn.Module
    train: TrainingView
    discovery: Discovery
    attack: AttackFacts
    device: torch.device
    seed: int = 0
    model_factory: object = None  # callable () -> fresh, randomly initialised model of the same architecture
    train_cfg: dict = field(default_factory=dict)  # the training run's `train` section (schedules of baselines)
    # synthetic forget samples (normalised images on the device, labels), e.g. from trigger synthesis
    extra_forget: tuple[torch.Tensor, torch.Tensor] | None = None
    meter: DataMeter = field(default_factory=DataMeter)

    @property
    def forget_idx(self) -> torch.Tensor:
        return self.discovery.forget_idx

    @property
    def retain_idx(self) -> torch.Tensor:
        return self.discovery.retain_idx

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def batches(self, idx: torch.Tensor, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0, epochs: float = 1.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised batches (x, given label) of ``idx`` on the task's device, augmented from the stored pixels."""
        images, labels = self.train.images, self.train.labels
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
                self.meter.samples += int(sel.numel())
                yield self.train.normalizer(x), labels[sel].to(self.device)
                produced += 1

    def accuracy_on(self, model: nn.Module, idx: torch.Tensor) -> float:
        """Accuracy of ``model`` on training samples ``idx`` against their given labels."""
        if idx.numel() == 0:
            return float("nan")
        self.meter.samples += int(idx.numel())
        preds = predict(model, self.train.images[idx], self.train.normalizer)
        return float((preds == self.train.labels[idx]).float().mean())

    def forget_accuracy(self, model: nn.Module, only: torch.Tensor | None = None) -> float:
        """Accuracy on the forget set against the given (poisoned) label (what PTN watches); ``only`` masks samples."""
        return self.accuracy_on(model, self.forget_idx if only is None else self.forget_idx[only])

    def forget_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole forget set, normalised, plus any synthetic samples."""
        idx = self.forget_idx
        x = self.train.normalised(idx, self.device)
        y = self.train.labels[idx].to(self.device)
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
