"""REM, Redirection for Erasing Memory (Schoepf, Mozer, Mitchell, Brintrup, Kaissis, Kairouz, Triantafillou;
arXiv 2505.17730, ICLR 2026): a removal step plus added neurons that absorb the corruption and are then discarded.

The algorithm (the paper's steps: expand, remove, redirect, discard), with ``D_f`` the discovered samples,
``D_tr`` the whole training set (discovered and undiscovered poison included) and CE the per-sample
cross-entropy against the training label:

1. Expand: give the network extra units ``theta_o2`` next to its own weights ``theta_o1``. In *redirect
   mode* every sample switches on its own fixed random subset of the added units (a binary mask,
   ``mask_share`` of them); all discovered samples share ONE mask, so their common pattern has one
   dedicated path. In *drop mode* the added units are off and the network is exactly the original.
2. The reference ``ref`` is a frozen copy of the expanded network at the start (redirect mode, eval).
3. Each epoch: (a) removal without the retain set: while the drop-mode accuracy on ``D_f`` (against the
   poisoned labels) exceeds ``threshold``, one pass of NPO over ``D_f`` in drop mode,
   ``-2/beta * log sigmoid(beta * (CE - CE_ref))`` (at most ``max_flush`` passes); (b) redirection: one
   pass over ``D_tr`` minimising ``2/beta * log sigmoid(beta * (CE_redirect - CE_ref))`` on every sample
   (redirect mode, ``theta_o1`` and ``theta_o2`` trained) plus the NPO term in drop mode on the samples of
   the batch that are in ``D_f`` (both averaged over the batch), so corruption that the training set
   re-teaches flows into the added units, not back into ``theta_o1``.
4. After each epoch the drop-mode model is scored with the paper's proxy ``acc(D_r) * (1 - max(acc(D_f),
   threshold))`` (``D_r`` = retain set, poisoned labels); the best epoch is kept (``select=proxy``).
5. The added units are discarded: the returned model is the original architecture with ``theta_o1``.

Defaults follow the authors' CIFAR-10 / ResNet-9 setting (their release): SGD, constant lr 0.005, momentum
0.9, weight decay 5e-4, batch 512 (here: the training run's), about 10 epochs (980 steps at batch 512),
beta 1, threshold 0.2, at most 100 removal passes per epoch, 20 % of the added units per mask, as many
added units as the layer has channels, masks after the 4 stages of ResNet-9.

The added units are residual side paths at automatically chosen taps (:mod:`potion.models.side_paths`). Batch-norm
layers train normally in the redirection passes; in the removal passes, whose batches hold only discovered
samples, they use and keep their running statistics (a choice of this implementation: the authors' code leaves
them in train mode, where a batch of a few confidently classified samples normalised by itself gives NPO
vanishing gradients and drags the running statistics towards the poison -- on a model trained to convergence the
removal then never reaches the threshold). Synthetic forget samples (``task.extra_forget``) are not used: REM
works on the discovered training samples.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.core.errors import ConfigError
from potion.core.progress import Progress
from potion.evaluation.backdoor import autocast_for
from potion.models.side_paths import AddedUnits, Redirection, Tap, choose_taps
from potion.unlearning import training_based as tb
from potion.unlearning.registry import MethodOutput, register, sync
from potion.unlearning.task import UnlearnTask

# --------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class REMSettings:
    """The validated arguments of one REM run."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    beta: float
    threshold: float
    max_flush: int
    width: float
    mask_share: float
    taps: int
    tap_modules: tuple[str, ...] | None
    augment: bool
    select: str


def rem_settings(task: UnlearnTask, **args: Any) -> REMSettings:
    """The arguments as one object (the schema's REM class checked them); batch_size null = the training run's."""
    names = args["tap_modules"]
    return REMSettings(**{**args, "batch_size": tb.batch_size_for(task, args["batch_size"]),
                          "tap_modules": None if names is None else tuple(names)})


class MaskBank:
    """Each training sample's fixed binary mask per tap; every discovered sample gets the one shared mask."""

    def __init__(self, units: list[int], num_train: int, forget_idx: torch.Tensor, share: float, seed: int,
                 device: torch.device) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        # row num_train is the discovered samples' shared mask
        self.tables = [(torch.rand(num_train + 1, m, generator=gen) < share).to(device) for m in units]
        self.shared_row = num_train
        self.is_forget = torch.zeros(num_train, dtype=torch.bool)
        self.is_forget[forget_idx.cpu()] = True
        self.is_forget = self.is_forget.to(device)

    def masks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The masks of the samples ``ids`` (device tensor), one [B, units] float tensor per tap."""
        rows = torch.where(self.is_forget[ids], torch.full_like(ids, self.shared_row), ids)
        return [t[rows].float() for t in self.tables]


# --------------------------------------------------------------------------------------- losses and data


def npo(ce: torch.Tensor, ce_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample NPO loss ``-2/beta * log sigmoid(beta * (CE - CE_ref))``: minimising raises CE above the reference.

    Its negative is REM's redirection loss, which lowers CE (weighted like NPO, saturating far from the
    reference).
    """
    return -2.0 / beta * F.logsigmoid(beta * (ce - ce_ref))


def ce_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (float32)."""
    with autocast_for(x.device):
        logits = model(x)
    return F.cross_entropy(logits.float(), y, reduction="none")


def id_batches(task: UnlearnTask, idx: torch.Tensor, batch_size: int, *, augment: bool, seed: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One shuffled pass over ``idx``: (sample indices on the device, images, poisoned labels) per batch."""
    order = idx[torch.randperm(int(idx.numel()), generator=torch.Generator().manual_seed(int(seed)))]
    for i in range(0, int(order.numel()), batch_size):
        sel = order[i:i + batch_size]
        x, y = next(task.batches(sel, int(sel.numel()), augment=augment))
        yield sel.to(task.device), x, y


# --------------------------------------------------------------------------------------- the method


@dataclass
class REMRun:
    """The objects one REM run trains: the model, its added units, the frozen reference and the masks."""

    task: UnlearnTask
    s: REMSettings
    model: nn.Module
    channel: Redirection
    ref: nn.Module
    ref_channel: Redirection
    bank: MaskBank
    opt: torch.optim.Optimizer

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def ref_ce(self, x: torch.Tensor, y: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        """The frozen starting network's per-sample CE in redirect mode (NPO's reference)."""
        with self.ref_channel.on(masks):
            return ce_of(self.ref, x, y)

    def flush(self, seed: int) -> tuple[int, int]:
        """Removal: NPO passes over the discovered samples (drop mode) until their accuracy is at most threshold.

        Returns (passes, optimizer steps).
        """
        passes, steps = 0, 0
        fbs = min(self.s.batch_size, int(self.task.forget_idx.numel()))
        while passes < self.s.max_flush and self.task.forget_accuracy(self.model) > self.s.threshold:
            # batch norm in eval mode: batches of discovered samples alone would rewrite the running statistics and,
            # normalised by themselves, leave a confident model with vanishing gradients
            tb.train_mode_partial(self.model, ())
            for ids, x, y in id_batches(self.task, self.task.forget_idx, fbs, augment=self.s.augment,
                                        seed=seed + passes):
                ce_ref = self.ref_ce(x, y, self.bank.masks(ids))
                self.step(npo(ce_of(self.model, x, y), ce_ref, self.s.beta).mean())
                steps += 1
            passes += 1
        return passes, steps

    def redirect(self, everything: torch.Tensor, seed: int, bar: Progress | None = None, note: str = ""
                 ) -> tuple[int, float]:
        """Redirection: one pass over the training set (redirect mode) with NPO on its discovered samples.

        ``bar`` counts its steps on the progress line (``note``: which epoch).
        """
        self.model.train()
        steps, total = 0, 0.0
        for ids, x, y in id_batches(self.task, everything, self.s.batch_size, augment=self.s.augment, seed=seed):
            masks = self.bank.masks(ids)
            ce_ref = self.ref_ce(x, y, masks)
            forget = self.bank.is_forget[ids]
            loss = torch.zeros((), device=x.device)
            if bool(forget.any()):  # removal on theta_o1 alone (drop mode), averaged over the whole batch
                loss = npo(ce_of(self.model, x, y), ce_ref, self.s.beta)[forget].sum() / x.shape[0]
            with self.channel.on(masks):
                loss = loss - npo(ce_of(self.model, x, y), ce_ref, self.s.beta).mean()
            self.step(loss)
            steps += 1
            total += float(loss.detach())
            if bar is not None:
                bar.advance(note=note)
        return steps, total / max(1, steps)

    def proxy(self) -> tuple[float, float, float]:
        """(proxy, forget accuracy, retain accuracy) of the drop-mode model (the model REM returns)."""
        forget_acc = self.task.forget_accuracy(self.model)
        keep = self.task.accuracy_on(self.model, self.task.retain_idx)  # poisoned labels, as the paper's proxy counts
        return keep * (1.0 - max(forget_acc, self.s.threshold)), forget_acc, keep


def build_run(task: UnlearnTask, s: REMSettings) -> tuple[REMRun, list[Tap], int]:
    """Copy the model, choose the taps, add the units, freeze a reference copy and draw the masks."""
    model = copy.deepcopy(task.model).to(task.device)
    everything = torch.cat([task.forget_idx, task.retain_idx])
    x_probe, _ = next(task.batches(everything[:2], 2))
    taps = choose_taps(model, x_probe, s.taps, s.tap_modules)
    units = [max(1, round(s.width * t.channels)) for t in taps]
    added = nn.ModuleList([AddedUnits(t, m) for t, m in zip(taps, units, strict=True)]).to(task.device)
    ref = copy.deepcopy(model).eval()
    ref_added = copy.deepcopy(added).eval()
    for p in [*ref.parameters(), *ref_added.parameters()]:
        p.requires_grad_(False)
    params = [*model.parameters(), *added.parameters()]
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    bank = MaskBank(units, task.num_train, task.forget_idx, s.mask_share, tb.stream_seed(task, 9), task.device)
    run = REMRun(task, s, model, Redirection(model, taps, added), ref, Redirection(ref, taps, ref_added), bank, opt)
    return run, taps, sum(p.numel() for p in added.parameters())


@register("rem", trains=True)
def rem(task: UnlearnTask, *, epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int | None,
        beta: float, threshold: float, max_flush: int, width: float, mask_share: float, taps: int,
        tap_modules: Sequence[str] | None, augment: bool, select: str) -> MethodOutput:
    """REM: NPO removal on the discovered samples, redirection of what the training set re-teaches into added units.

    See the module docstring for the algorithm. The poisoned ``task.model`` is not modified; the returned
    model has its architecture (the added units are discarded), is in eval mode and fully trainable.
    """
    s = rem_settings(task, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     batch_size=batch_size, beta=beta, threshold=threshold, max_flush=max_flush, width=width,
                     mask_share=mask_share, taps=taps, tap_modules=tap_modules, augment=augment, select=select)
    if task.forget_idx.numel() == 0:
        raise ConfigError("rem: the forget set is empty: nothing to remove")
    sync(task.device)
    t_start = time.perf_counter()
    everything = torch.cat([task.forget_idx, task.retain_idx])
    with tb.seeded(task):
        run, tap_list, added_params = build_run(task, s)
        try:
            best, flush_passes, flush_steps, steps, last_loss = None, [], 0, 0, float("nan")
            bar = Progress("rem redirection", s.epochs * math.ceil(int(everything.numel()) / s.batch_size))
            for epoch in range(s.epochs):
                passes, n = run.flush(tb.stream_seed(task, 1) + 1009 * epoch)
                flush_passes.append(passes)
                flush_steps += n
                n, last_loss = run.redirect(everything, tb.stream_seed(task, 2) + epoch, bar,
                                            f"epoch {epoch + 1} of {s.epochs}, {flush_steps} removal steps so far")
                steps += n
                proxy, forget_acc, keep = run.proxy()
                if best is None or s.select == "last" or proxy > best[0]:
                    state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
                    best = (proxy, epoch, forget_acc, keep, state)
            bar.finish()
        finally:
            run.channel.remove()
            run.ref_channel.remove()
    proxy, best_epoch, forget_acc, keep, state = best
    model = run.model
    model.load_state_dict(state)
    tb.finished(model)
    sync(task.device)
    diagnostics = {
        "epochs": s.epochs, "iterations": steps + flush_steps, "redirect_steps": steps,
        "flush_steps": flush_steps, "flush_passes": sum(flush_passes), "flush_passes_first_epoch": flush_passes[0],
        "selected_epoch": best_epoch + 1, "selected_proxy": proxy, "selected_forget_acc": forget_acc,
        "selected_retain_acc": keep, "final_redirect_loss": last_loss, "taps": len(tap_list),
        "added_params": added_params, "rem_tap_modules": ",".join(t.name for t in tap_list),
    }
    return MethodOutput(model, diagnostics, {"train_seconds": time.perf_counter() - t_start})
