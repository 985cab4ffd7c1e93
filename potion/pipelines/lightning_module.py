"""Lightning training of a (poisoned) classifier: schedule, batch-wise augmentation, trigger, checkpoints.

The LightningModule owns only what is specific to this project; the loop, precision, devices,
strategies and checkpoint/resume mechanics are Lightning's.
"""

from __future__ import annotations

import pickle
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.plugins.io import TorchCheckpointIO

from potion.core import interrupt
from potion.core.errors import CheckpointError
from potion.core.io import _atomic, refused_pickle, write_torch
from potion.core.schedule import warmup_linear_decay
from potion.data.augment import Normalizer, random_crop_flip
from potion.data.poison import Trigger


class PoisonTrainingModule(pl.LightningModule):
    """Cross-entropy training of ``model`` on batches of (uint8 images, labels, poisoned flags).

    Augmentation, normalisation and the trigger run batch-wise on the device in
    ``on_after_batch_transfer``, in that order (the trigger after augmentation, so its position is fixed).
    """

    def __init__(self, model: nn.Module, normalizer: Normalizer, trigger: Trigger, *, lr: float, momentum: float,
                 weight_decay: float, total_steps: int, warmup: float = 0.01, nesterov: bool = False,
                 label_smoothing: float = 0.0, crop_padding: int = 4, flip: bool = True,
                 channels_last: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.normalizer = normalizer
        self.trigger = trigger
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.total_steps = total_steps
        self.warmup = warmup
        self.nesterov = nesterov
        self.label_smoothing = label_smoothing
        self.crop_padding = crop_padding
        self.flip = flip
        self.channels_last = channels_last
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, flags = batch
        if self.trainer is not None and self.trainer.training:
            gen = torch.Generator(device=images.device)
            gen.manual_seed(self.seed * 1_000_003 + 7919 * self.global_step + 1)
            images = random_crop_flip(images, self.crop_padding, self.flip, gen)
        x = self.trigger.apply(self.normalizer(images), flags)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        self.log("train_acc", acc, on_step=False, on_epoch=True, prog_bar=False, batch_size=y.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay, nesterov=self.nesterov)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(self.total_steps, self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically (temp + rename) and read back with ``weights_only=True``.

    ``preloaded``: a checkpoint already read and checked by :func:`read_resume_checkpoint`, handed to
    Lightning instead of reading the file a second time.
    """

    def __init__(self, preloaded: tuple[Path, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.preloaded = preloaded

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        _atomic(Path(path), lambda p: write_torch(checkpoint, p))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        if self.preloaded is not None and Path(path) == self.preloaded[0]:
            checkpoint, self.preloaded = self.preloaded[1], None
            return checkpoint
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


# What every checkpoint Lightning writes during fit holds; anything less cannot be resumed from.
RESUME_KEYS = {"state_dict": Mapping, "optimizer_states": list, "loops": Mapping, "global_step": int, "epoch": int}


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """Read a Lightning checkpoint to resume from, refusing anything else in one CheckpointError line.

    Read with ``weights_only=True`` (pickled objects are refused, never run); a truncated or garbage file,
    or a bare state dict without the optimizer and loop state, cannot be resumed from.
    """
    fix = f"delete {path} to train from the start, or add force=true to retrain from scratch"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not refused_pickle(exc):  # torch refused a pickled object; anything else is a damaged file
            raise CheckpointError(f"cannot resume from {path}: corrupt or truncated (UnpicklingError); {fix}"
                                  ) from exc
        raise CheckpointError(f"refused to resume from {path}: it holds pickled objects, not a checkpoint of "
                              f"tensors ({fix})") from exc
    except Exception as exc:  # noqa: BLE001 - every reader failure means a damaged file
        raise CheckpointError(f"cannot resume from {path}: corrupt or truncated ({type(exc).__name__}); {fix}"
                              ) from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"cannot resume from {path}: not a Lightning checkpoint; {fix}")
    missing = [k for k, kind in RESUME_KEYS.items() if not isinstance(checkpoint.get(k), kind)]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: not a Lightning training checkpoint (no "
                              f"{', '.join(missing)}; a bare state dict has no optimizer or loop state); {fix}")
    return dict(checkpoint)


def check_checkpoint_fits(checkpoint: Mapping[str, Any], module: nn.Module, path: Path) -> None:
    """The checkpoint's weights have this module's names and shapes (else Lightning fails with a traceback)."""
    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
        raise CheckpointError(f"cannot resume from {path}: its weights do not fit this model (first difference: "
                              f"{diff[0]}); delete it, or add force=true to retrain from scratch")


class StopOnSignal(pl.Callback):
    """A SIGTERM/SIGINT recorded by :func:`potion.core.interrupt.deferred` stops the fit at the end of a step.

    The checkpoint is written there first (to the path resume reads), so the resumed run loses no step.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = interrupt.pending()
        stop = signum is not None
        if trainer.world_size > 1:  # every rank stops at the same step (save_checkpoint is collective)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = signum if signum is not None else int(signal.SIGTERM)
        trainer.save_checkpoint(self.path)
        raise interrupt.Interrupted(signum, f"stopped after step {trainer.global_step}, checkpoint {self.path}")


class EpochMetricsCallback(pl.Callback):
    """Hands per-epoch training metrics (and an optional evaluation) to a sink, e.g. the MLflow tracker."""

    def __init__(self, sink: Callable[[dict[str, float], int], None],
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> None:
        self.sink = sink
        self.evaluate = evaluate

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")}
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:
            out["lr"] = float(opt.param_groups[0]["lr"])
        if self.evaluate is not None:
            out.update({f"epoch_{k}": v for k, v in self.evaluate(pl_module.model).items()})
        self.sink(out, trainer.current_epoch)


