"""Trigger synthesis: turn a few discovered samples into many, by finding the trigger and re-pasting it.

With one discovered sample, PTN's stopping signal rests on a single prediction and the forget
importance on a single gradient. If the trigger is a local patch, the discovered sample reveals it:
the input-gradient saliency of the target logit concentrates on it. Candidate windows (several sizes,
the most salient positions) are cut out of the discovered sample and pasted onto clean retain images;
the window that flips the poisoned model's predictions to the target most often is taken as the
trigger, and those pasted images (labelled as the target) join the forget set. The chosen window is
refined by shifting it a pixel either way and growing or shrinking it (the saliency peak of a corner
patch can sit a row inside the image), then shrunk to the trigger's pixels.

Image-wide additive triggers (blend, SIG, FTrojan, faint corner patterns) have no window: with several
discovered samples their mean minus the mean of clean images estimates the trigger itself (host images
average out), and adding that estimate to clean probes gives synthetic poison just the same. An
estimate that flips too few probes (e.g. a warp, or too few samples) is dropped: nothing is synthesised.

With fewer discovered samples the mean keeps their host images, so the trigger is *inverted* instead: a
perturbation added to clean images is optimised to send them to the target while taking it out of the
discovered samples sends them away from it, with an L2 penalty. A backdoor is a shortcut to its target, so
the cheapest such perturbation points along the trigger (what that buys on the CIFAR attack grid:
docs/results.md, *Attacks beyond the patch*). An inversion that flips too few held-out probes is dropped too.

An all-to-all attack has no single target (``target=None``): a window then "flips" a probe when it changes
the poisoned model's prediction at all, candidate windows are the most salient for the predicted logit's margin
over the runner-up plus those whose blanking most lowers the predicted class (occlusion; either alone missed
the patch on one of our models), and each synthetic sample is labelled with its triggered prediction (probes
the window leaves alone are not kept). Label-free: the mapping itself is never used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SynthesisResult:
    """The recovered trigger (a window, or an additive image for ``size == 0``) and the synthetic samples."""

    row: int
    col: int
    size: int
    flip_rate: float
    images: torch.Tensor
    labels: torch.Tensor
    delta: torch.Tensor | None = None  # [C, H, W] additive estimate (image-wide triggers)

    @property
    def additive(self) -> bool:
        return self.delta is not None

    def summary(self) -> dict[str, float]:
        return {"synth_row": self.row, "synth_col": self.col, "synth_size": self.size,
                "synth_flip_rate": self.flip_rate, "synth_samples": int(self.labels.numel()),
                "synth_additive": float(self.additive)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The result as flat tensors (a cache entry); :meth:`from_tensors` reads it back."""
        out = {"images": self.images, "labels": self.labels,
               "flip_rate": torch.tensor(self.flip_rate, dtype=torch.float64),
               "window": torch.tensor([self.row, self.col, self.size], dtype=torch.int64)}
        return out if self.delta is None else {**out, "delta": self.delta}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], device: torch.device) -> SynthesisResult | None:
        """A result stored by :meth:`to_tensors` (on ``device``), or None where the entry holds no trigger."""
        if "window" not in t:
            return None
        row, col, size = (int(v) for v in t["window"].tolist())
        delta = t.get("delta")
        return cls(row, col, size, float(t["flip_rate"]), t["images"].to(device), t["labels"].to(device),
                   None if delta is None else delta.to(device))

    def remove_from(self, x: torch.Tensor, clean: torch.Tensor | None = None, margin: int = 1) -> torch.Tensor:
        """``x`` with the recovered trigger taken out: the estimate subtracted, or the window and ``margin`` pixels
        around it filled with what clean images hold there (the per-pixel median of ``clean``, normalised images;
        the mean colour without them).

        The window is the smallest that flips the probes; a model trained with crop augmentation also answers to
        the rest of a larger patch, so the margin takes that out too. A fill of the mean colour can itself read
        as a patch (a grey square in a black corner of a digit); clean images' own pixels there do not."""
        if self.delta is not None:
            return x - self.delta.to(x.device, x.dtype)
        out = x.clone()
        r0, c0 = max(0, self.row - margin), max(0, self.col - margin)
        r1, c1 = self.row + self.size + margin, self.col + self.size + margin
        fill = 0.0 if clean is None or not clean.shape[0] else clean[:, :, r0:r1, c0:c1].median(0).values
        out[:, :, r0:r1, c0:c1] = fill
        return out


def saliency_map(model: nn.Module, x: torch.Tensor, target: int | None) -> torch.Tensor:
    """Mean over samples of sum over channels of |d logit_target / d input| -> [H, W] (``target=None``: of each
    sample's predicted logit's margin over its runner-up, what sets the triggered label apart from the host's)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    logits = model(x)
    if target is None:
        top2 = logits.topk(2, dim=1).values
        (top2[:, 0] - top2[:, 1]).sum().backward()
    else:
        logits[:, target].sum().backward()
    model.zero_grad(set_to_none=True)
    return x.grad.detach().abs().sum(1).mean(0)


@torch.no_grad()
def occlusion_map(model: nn.Module, x: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """How much blanking each k x k window (the mean colour, 0 once normalised) lowers the probability of the
    predicted class of ``x`` (one image) -> [H-k+1, W-k+1].

    Where a trigger sends each class to a label of its own (all-to-all), the predicted logit's input gradient
    follows the host object as much as the trigger; taking the trigger out is what gives the host class back.
    """
    model.eval()
    _, _, h, w = x.shape
    probs = model(x).float().softmax(1)
    pred = int(probs.argmax(1))
    spots = [(r, c) for r in range(h - k + 1) for c in range(w - k + 1)]
    drops = []
    for i in range(0, len(spots), chunk):
        part = spots[i:i + chunk]
        images = x.repeat(len(part), 1, 1, 1)
        for j, (r, c) in enumerate(part):
            images[j, :, r:r + k, c:c + k] = 0.0
        drops.append(probs[0, pred] - model(images).float().softmax(1)[:, pred])
    return torch.cat(drops).view(h - k + 1, w - k + 1)


def paste(images: torch.Tensor, patch: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Copy ``patch`` [C, k, k] into every image at (row, col)."""
    out = images.clone()
    k = patch.shape[-1]
    out[:, :, row:row + k, col:col + k] = patch
    return out


@torch.no_grad()
def flip_rate(model: nn.Module, probes: torch.Tensor, target: int | None, clean: torch.Tensor | None = None
              ) -> float:
    """Share of probe images predicted as the target (``target=None``: predicted otherwise than ``clean``, the
    probes' own predictions; None too: no probe counts as flipped)."""
    pred = model(probes).argmax(1)
    if target is None:
        return 0.0 if clean is None else float((pred != clean).float().mean())
    return float((pred == target).float().mean())


@torch.no_grad()
def strength(model: nn.Module, probes: torch.Tensor, target: int | None, clean: torch.Tensor | None = None
             ) -> tuple[float, float]:
    """(flip rate, mean target probability): the second tells a whole trigger from a part of it when a model
    already flips on the part (both flip every probe; the whole one more confidently). ``target=None``: flipped
    = predicted otherwise than ``clean``, and the probability is the one taken away from ``clean``."""
    probs = model(probes).float().softmax(1)
    if target is None:
        assert clean is not None, "target=None needs the probes' own predictions"
        return (float((probs.argmax(1) != clean).float().mean()),
                float(1 - probs.gather(1, clean[:, None]).mean()))
    return float((probs.argmax(1) == target).float().mean()), float(probs[:, target].mean())


@torch.no_grad()
def own_predictions(model: nn.Module, probes: torch.Tensor, target: int | None) -> torch.Tensor | None:
    """The probes' own predictions when there is no single target (all-to-all), else None (not needed)."""
    return model(probes).argmax(1) if target is None else None


def synthesize_forget(model: nn.Module, forget_x: torch.Tensor, probe_x: torch.Tensor, target: int | None, *,
                      sizes: Sequence[int] = (2, 3, 4, 5), candidates: int = 4, min_flip_rate: float = 0.5,
                      ) -> SynthesisResult | None:
    """Locate a patch trigger in the discovered samples and paste it onto ``probe_x`` (normalised, non-target).

    Returns None when no candidate window flips at least ``min_flip_rate`` of the probes to the target.
    ``target=None`` (all-to-all): candidate windows from saliency and occlusion (:func:`occlusion_map`), flipped = the
    prediction changed; the synthetic samples are the flipped probes, labelled with their triggered predictions.
    """
    best = best_window(model, forget_x, probe_x, target, sizes=sizes, candidates=candidates,
                       min_flip_rate=min_flip_rate)
    if best is None:
        return None
    measure = WindowStrength(model, forget_x[0], probe_x, target)
    rate, r, c, k = _shrink(measure, _refine(measure, best))
    images = paste(probe_x, forget_x[0, :, r:r + k, c:c + k], r, c)
    if target is None:
        labels = own_predictions(model, images, target)
        flipped = labels != measure.clean
        return SynthesisResult(r, c, k, rate, images[flipped], labels[flipped])
    labels = torch.full((images.shape[0],), target, dtype=torch.long, device=images.device)
    return SynthesisResult(r, c, k, rate, images, labels)


def best_window(model: nn.Module, forget_x: torch.Tensor, probe_x: torch.Tensor, target: int | None, *,
                sizes: Sequence[int] = (2, 3, 4, 5), candidates: int = 4, min_flip_rate: float = 0.5,
                ) -> tuple[float, int, int, int] | None:
    """(flip rate, row, col, size) of the most salient window that flips the most probes, before refinement;
    None when none flips at least ``min_flip_rate`` (and 0.25 more than the probes alone).

    Whether a patch trigger is there at all is decided here: callers that only need that answer
    (``patch_present``) skip the refinement, which costs about twice as many probe passes.
    """
    model.eval()
    sal = saliency_map(model, forget_x, target)
    h, w = sal.shape
    clean = own_predictions(model, probe_x, target)
    base_rate = flip_rate(model, probe_x, target, clean)
    best: tuple[float, int, int, int] | None = None
    for k in sizes:
        if k > min(h, w):
            continue
        # the most salient windows; all-to-all adds those whose blanking takes the most away (either can miss)
        maps = [F.avg_pool2d(sal[None, None], k, stride=1)[0, 0]]  # [H-k+1, W-k+1]
        if target is None:
            maps.append(occlusion_map(model, forget_x[:1], k))
        spots: list[int] = []
        for window in maps:
            top = torch.topk(window.flatten(), min(candidates, window.numel())).indices.tolist()
            spots += [f for f in top if f not in spots]
        for flat in spots:
            r, c = divmod(flat, w - k + 1)
            patch = forget_x[0, :, r:r + k, c:c + k]
            rate = flip_rate(model, paste(probe_x, patch, r, c), target, clean)
            # prefer the higher flip rate; at a tie, the smaller window (less of the host image copied)
            if best is None or rate > best[0] + 1e-9:
                best = (rate, r, c, k)
    if best is None or best[0] < max(min_flip_rate, base_rate + 0.25):
        return None
    return best


def patch_present(model: nn.Module, forget_x: torch.Tensor, probe_x: torch.Tensor, target: int | None, *,
                  sizes: Sequence[int] = (2, 3, 4, 5), min_flip_rate: float = 0.5) -> bool:
    """Whether :func:`synthesize_forget` would find a patch trigger (the same test, without locating it exactly)."""
    return best_window(model, forget_x, probe_x, target, sizes=sizes, min_flip_rate=min_flip_rate) is not None


class WindowStrength:
    """:func:`strength` of a window of ``source`` pasted onto the probes, each window measured once.

    Refining and shrinking revisit windows (shifts clamped at the image border coincide; a sub-window
    tried while shrinking was often a refinement candidate already): the same window gives the same
    numbers, so each is computed once.
    """

    def __init__(self, model: nn.Module, source: torch.Tensor, probe_x: torch.Tensor, target: int | None) -> None:
        self.model, self.source, self.probe_x, self.target = model, source, probe_x, target
        self.clean = own_predictions(model, probe_x, target)
        self.seen: dict[tuple[int, int, int], tuple[float, float]] = {}

    def __call__(self, r: int, c: int, k: int) -> tuple[float, float]:
        if (r, c, k) not in self.seen:
            window = self.source[:, r:r + k, c:c + k]
            self.seen[(r, c, k)] = strength(self.model, paste(self.probe_x, window, r, c), self.target, self.clean)
        return self.seen[(r, c, k)]


def _refine(measure: WindowStrength, best: tuple[float, int, int, int]) -> tuple[float, int, int, int]:
    """The best window among the chosen one shifted by up to a pixel and grown or shrunk by one, so a trigger
    touching the image border is covered whole: highest flip rate, then highest target probability, then
    the smaller window."""
    _, r, c, k = best
    _, h, w = measure.source.shape

    def key(rr: int, cc: int, kk: int) -> tuple[float, float, int]:
        rate, prob = measure(rr, cc, kk)
        return round(rate, 6), round(prob, 4), -kk

    found, found_key = (r, c, k), key(r, c, k)
    for kk in (k - 1, k, k + 1):
        if kk < 1 or kk > min(h, w):
            continue
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = min(max(r + dr, 0), h - kk), min(max(c + dc, 0), w - kk)
                if (rr, cc, kk) == found:
                    continue
                cand = key(rr, cc, kk)
                if cand > found_key:
                    found, found_key = (rr, cc, kk), cand
    return found_key[0], *found


def synthesize_additive(model: nn.Module, forget_x: torch.Tensor, reference_x: torch.Tensor, probe_x: torch.Tensor,
                        target: int, *, min_flip_rate: float = 0.5) -> SynthesisResult | None:
    """Estimate an image-wide additive trigger as mean(discovered) - mean(clean reference images) and add it
    to ``probe_x`` (normalised, non-target); None when the estimate flips fewer than ``min_flip_rate`` of
    the probes (and at least 0.25 more than the probes alone)."""
    model.eval()
    delta = forget_x.mean(0) - reference_x.mean(0)
    images = probe_x + delta
    rate = flip_rate(model, images, target)
    if rate < max(min_flip_rate, flip_rate(model, probe_x, target) + 0.25):
        return None
    labels = torch.full((images.shape[0],), target, dtype=torch.long, device=images.device)
    return SynthesisResult(-1, -1, 0, rate, images, labels, delta)


def invert_additive(model: nn.Module, forget_x: torch.Tensor, probe_x: torch.Tensor, target: int, *,
                    steps: int = 60, lr: float = 0.01, l2: float = 0.01, batch: int = 64, min_flip_rate: float = 0.5,
                    seed: int = 0) -> SynthesisResult | None:
    """Optimise an image-wide additive trigger from a few discovered samples and add it to ``probe_x``.

    Loss: cross-entropy of (probe + delta) to the target, plus -log(1 - p_target(discovered - delta)) (taking
    the trigger out of a discovered sample leaves a host image of another class), plus ``l2`` * |delta|^2.
    Fitted on half of the probes, judged on the other half: None when it flips fewer than ``min_flip_rate``
    of them (and at least 0.25 more than the probes alone). Only the input is optimised; the model's
    parameters and their gradients are left untouched.
    """
    model.eval()
    half = max(1, probe_x.shape[0] // 2)
    fit, check = probe_x[:half], probe_x[half:] if probe_x.shape[0] > 1 else probe_x
    delta = torch.zeros_like(forget_x[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    goal = torch.full((min(batch, fit.shape[0]),), target, dtype=torch.long, device=probe_x.device)
    for _ in range(int(steps)):
        pick = torch.randperm(fit.shape[0], generator=gen)[:goal.numel()].to(probe_x.device)
        to_target = F.cross_entropy(model(fit[pick] + delta), goal)
        p_host = model(forget_x - delta).float().softmax(1)[:, target]
        from_target = -torch.log1p(-p_host.clamp(max=1 - 1e-6)).mean()
        loss = to_target + from_target + l2 * delta.pow(2).sum()
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
    delta = delta.detach()
    rate = flip_rate(model, check + delta, target)
    if rate < max(min_flip_rate, flip_rate(model, check, target) + 0.25):
        return None
    images = probe_x + delta
    labels = torch.full((images.shape[0],), target, dtype=torch.long, device=images.device)
    return SynthesisResult(-1, -1, 0, rate, images, labels, delta)


def _shrink(measure: WindowStrength, best: tuple[float, int, int, int], slack: float = 0.02
            ) -> tuple[float, int, int, int]:
    """The smallest window inside the chosen one that still flips (almost) as many probes.

    A window larger than the trigger copies host pixels of the discovered image too; those make the
    synthetic samples less like real poison and the signature match fewer real poisoned samples.
    """
    rate, r, c, k = best
    final = rate
    while k > 1:
        options = [(*measure(r + dr, c + dc, k - 1), r + dr, c + dc) for dr in (0, 1) for dc in (0, 1)]
        sub_rate, _, sub_r, sub_c = max(options, key=lambda o: (round(o[0], 6), o[1]))
        if sub_rate < rate - slack:
            break
        r, c, k, final = sub_r, sub_c, k - 1, sub_rate
    return final, r, c, k
