"""Find the poison the defender missed: rank retain samples by how much healing changed them.

Score of a training sample = log p_poisoned(given label | x) - log p_healed(given label | x): how much
belief in its (possibly poisoned) label the healing removed. Undiscovered poison carries the trigger and
the target label, so healing, which neutralises the trigger, removes that belief; clean samples keep
it. One forward pass per model over the retain set.

The suggested cut-off is data-driven: the discovered samples are known poison, so their scores show
what "neutralised poison" looks like; the cut-off is ``cutoff_fraction`` times a low quantile of them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.core.io import atomic_write_text
from potion.data.defender import TrainingView
from potion.evaluation.backdoor import logits_of


@dataclass
class SuspectRanking:
    """Scores of the retain samples (training indices ``idx``) and the suggested cut-off."""

    idx: torch.Tensor
    scores: torch.Tensor
    cutoff: float
    forget_scores: torch.Tensor
    by_signature: bool = False  # the cut-off flags exactly the samples carrying a recovered trigger signature

    def flagged(self) -> torch.Tensor:
        """Training indices scored above the cut-off, best first."""
        order = torch.argsort(self.scores, descending=True)
        keep = self.scores[order] > self.cutoff
        return self.idx[order][keep]


def label_logprob_drop(poisoned: nn.Module, healed: nn.Module, view: TrainingView, idx: torch.Tensor,
                       batch_size: int = 1024, before_logits: torch.Tensor | None = None) -> torch.Tensor:
    """log p_poisoned(y|x) - log p_healed(y|x) for training samples ``idx`` as the training set holds them.

    ``before_logits`` (the poisoned model's logits for the whole training set) skips its forward pass.
    """
    images = view.images[idx]
    labels = view.labels[idx].view(-1, 1)
    raw = before_logits[idx] if before_logits is not None else logits_of(poisoned, images, view.normalizer,
                                                                         batch_size=batch_size)
    before = F.log_softmax(raw, 1)
    after = F.log_softmax(logits_of(healed, images, view.normalizer, batch_size=batch_size), 1)
    return (before.gather(1, labels) - after.gather(1, labels)).view(-1)


@dataclass
class Signature:
    """A patch trigger recovered from the discovered samples: window position, size and normalised pixels."""

    row: int
    col: int
    patch: torch.Tensor  # [C, k, k], normalised
    flip_rate: float
    mask: torch.Tensor | None = None  # [k, k]: the pixels that are the trigger (None = the whole window)


def find_signature(model: nn.Module, view: TrainingView, forget_idx: torch.Tensor, retain_idx: torch.Tensor,
                   target: int, probes: int = 256, seed: int = 0) -> Signature | None:
    """Locate a patch trigger in the discovered samples (see unlearning/synthesis.py); None if none is found."""
    from potion.evaluation.backdoor import model_device
    from potion.unlearning.synthesis import synthesize_forget

    dev = model_device(model)
    pool = retain_idx[view.labels[retain_idx] != target]
    if pool.numel() == 0 or forget_idx.numel() == 0:
        return None
    pick = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:probes]]
    forget_x = view.normalised(forget_idx[:64], dev)
    probe_x = view.normalised(pick, dev)
    found = synthesize_forget(model, forget_x, probe_x, target)
    if found is None:
        return None
    k, r, c = found.size, found.row, found.col
    windows = forget_x[:, :, r:r + k, c:c + k].cpu()
    if windows.shape[0] > 1:
        # pixels on which every discovered sample agrees are the trigger; the rest is host image
        spread = (windows.amax(0) - windows.amin(0)).amax(0)  # [k, k]
        mask: torch.Tensor | None = spread < MATCH_TOL
        if not bool(mask.any()):
            return None
    else:
        # one discovered sample cannot tell trigger from host pixels by itself: the training set can
        mask = single_sample_mask(view, windows[0], r, c, retain_idx, target, seed=seed)
    return Signature(r, c, windows[0], found.flip_rate, mask)


def single_sample_mask(view: TrainingView, patch: torch.Tensor, row: int, col: int, retain_idx: torch.Tensor,
                       target: int, *, reference: int = 5000, min_matches: int = 2, max_false_share: float = 0.1,
                       seed: int = 0) -> torch.Tensor | None:
    """The trigger pixels of a window cut from ONE discovered sample, told apart by the rest of the training set.

    All-to-one poison carries the target label, so a trigger pixel's value recurs far more often among
    target-labelled retain samples than among the others, while a host pixel's value recurs (if at all)
    equally in both. Pixels whose excess match rate is at least half the best pixel's form the mask. It is
    kept only if at least ``min_matches`` target-labelled samples carry every mask pixel and the
    non-target samples' rate of the same match predicts at most ``max_false_share`` of them as chance
    matches; otherwise None (no exact signature: the caller falls back to the score cut-off).
    """
    labels = view.labels[retain_idx]
    own, other = retain_idx[labels == target], retain_idx[labels != target]
    if own.numel() == 0 or other.numel() == 0:
        return None
    other = other[torch.randperm(other.numel(), generator=torch.Generator().manual_seed(seed + 41))[:reference]]
    k = patch.shape[-1]
    hit_own = pixel_matches(view, own, row, col, patch)  # [n, k, k]
    hit_other = pixel_matches(view, other, row, col, patch)
    excess = hit_own.float().mean(0) - hit_other.float().mean(0)
    best = float(excess.max())
    if best * own.numel() < min_matches:
        return None
    mask = excess >= 0.5 * best
    n_own = int(hit_own[:, mask].all(1).sum())
    chance = float(hit_other[:, mask].all(1).float().mean()) * own.numel()
    if n_own < min_matches or chance > max_false_share * n_own:
        return None
    return mask.view(k, k)


MATCH_TOL = 0.05  # normalised units (about 3/255 of a pixel): exact triggers, lightly re-encoded ones


def signature_matches(view: TrainingView, idx: torch.Tensor, sig: Signature) -> torch.Tensor:
    """True where a training sample (as the training set holds it) carries the recovered patch (every pixel within
    MATCH_TOL)."""
    hits = pixel_matches(view, idx, sig.row, sig.col, sig.patch)  # [n, k, k]
    if sig.mask is not None:
        hits = hits[:, sig.mask]
    return hits.flatten(1).all(1)


def pixel_matches(view: TrainingView, idx: torch.Tensor, row: int, col: int, patch: torch.Tensor,
                  tol: float = MATCH_TOL, chunk: int = 4096) -> torch.Tensor:
    """[n, k, k]: where each training sample's window (as the training set shows it) equals ``patch`` pixel by pixel."""
    k = patch.shape[-1]
    out = []
    for i in range(0, idx.numel(), chunk):
        sel = idx[i:i + chunk]
        win = view.normalised(sel)[:, :, row:row + k, col:col + k]
        out.append((win - patch).abs().amax(1) < tol)
    return torch.cat(out) if out else torch.zeros(0, k, k, dtype=torch.bool)


SIGNATURE_BONUS = 1000.0


def find_suspects(poisoned: nn.Module, healed: nn.Module, view: TrainingView, retain_idx: torch.Tensor,
                  forget_idx: torch.Tensor, *, target: int | None, signature: bool = True, target_only: bool = True,
                  seed: int = 0, cutoff_quantile: float = 0.1, cutoff_fraction: float = 0.5, batch_size: int = 1024,
                  before_logits: torch.Tensor | None = None) -> tuple[SuspectRanking, Signature | None]:
    """The suspect ranking every caller uses (unlearning runs, practitioner healing, iterative rounds): every retain
    sample scored; cut-off = cutoff_fraction * (cutoff_quantile of the discovered samples' scores).

    ``signature``: recover the patch trigger from the discovered samples first (``find_signature``); samples whose
    pixels carry it rank first (score + SIGNATURE_BONUS) and the cut-off flags exactly those (see below for a
    signature that nothing matches): this also finds poisoned samples whose true class is the target, which healing
    leaves unchanged, and keeps the flagged list precise.
    ``target_only``: an all-to-one backdoor's poison carries the target label (dirty- and clean-label attacks
    alike), so samples with another label rank last (score - SIGNATURE_BONUS) and are never flagged.
    ``target`` None (all-to-all: poison carries every label): neither the target label nor a target patch
    tells it apart, so both are off.
    """
    if target is None:
        signature, target_only = False, False
    sig = find_signature(poisoned, view, forget_idx, retain_idx, int(target), seed=seed) if signature else None
    scores = label_logprob_drop(poisoned, healed, view, retain_idx, batch_size, before_logits)
    forget_scores = label_logprob_drop(poisoned, healed, view, forget_idx, batch_size, before_logits)
    reference = float(torch.quantile(forget_scores.float(), cutoff_quantile)) if forget_scores.numel() else 0.0
    cutoff = max(cutoff_fraction * reference, 1e-6)
    if target_only:
        scores = scores - SIGNATURE_BONUS * (view.labels[retain_idx] != target).float()
    if sig is not None:
        # poison carries the target label, so only target-labelled samples can be poison carrying the trigger
        matched = signature_matches(view, retain_idx, sig) & (view.labels[retain_idx] == target)
        scores = scores + SIGNATURE_BONUS * matched.float()
        # a trigger signature is the strongest evidence: flag its matches only. One recovered from several
        # discovered samples (the pixels they all share, ``mask``) is exact, so when no retain sample
        # carries it there is no undiscovered poison to flag (e.g. everything was discovered); one from a
        # single sample may include host pixels, so without matches the log-probability cut-off stays.
        if bool(matched.any()) or sig.mask is not None:
            cutoff = SIGNATURE_BONUS / 2
    ranking = SuspectRanking(retain_idx, scores, cutoff, forget_scores, by_signature=cutoff == SIGNATURE_BONUS / 2)
    return ranking, sig


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Average precision of a ranking (higher score = more suspect) against a boolean truth."""
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    hits = positives[order].float()
    precision = hits.cumsum(0) / torch.arange(1, hits.numel() + 1)
    return float((precision * hits).sum() / n_pos)


def ranking_quality(ranking: SuspectRanking, is_poison: torch.Tensor) -> dict[str, float]:
    """suspect_precision / suspect_recall at the cut-off and suspect_ap, against the true undiscovered poison."""
    truth = is_poison[ranking.idx]
    flagged = ranking.scores > ranking.cutoff
    n_flag = int(flagged.sum())
    tp = int((flagged & truth).sum())
    n_pos = int(truth.sum())
    return {
        "suspect_precision": tp / n_flag if n_flag else float("nan"),
        "suspect_recall": tp / n_pos if n_pos else float("nan"),
        "suspect_ap": average_precision(ranking.scores, truth),
        "suspects_flagged": float(n_flag),
        "suspect_cutoff": ranking.cutoff,
    }


def write_suspects_csv(path: str | Path, ranking: SuspectRanking, paths: tuple[str, ...] | None = None,
                       limit: int | None = None) -> Path:
    """suspects.csv: rank, training index, file path (image folders), score, above_cutoff; best first."""
    order = torch.argsort(ranking.scores, descending=True)
    if limit is not None:
        order = order[:limit]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "index", "path", "score", "above_cutoff"])
    for rank, j in enumerate(order.tolist(), start=1):
        i = int(ranking.idx[j])
        s = float(ranking.scores[j])
        w.writerow([rank, i, paths[i] if paths else "", f"{s:.6g}", int(s > ranking.cutoff)])
    return atomic_write_text(path, buf.getvalue())


def suspects_summary(ranking: SuspectRanking, is_poison: torch.Tensor | None) -> dict[str, Any]:
    """What the unlearning summary records about the ranking."""
    out: dict[str, Any] = {"suspect_cutoff": ranking.cutoff,
                           "suspects_flagged": int((ranking.scores > ranking.cutoff).sum())}
    if is_poison is not None:
        out.update(ranking_quality(ranking, is_poison))
    return out
