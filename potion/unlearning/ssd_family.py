"""SSD, ASSD, LFSSD and Potion: one importance estimator + one dampening rule, configured four ways.

| method | importance loss | accumulate | alpha |
|---|---|---|---|
| ssd    | cross-entropy      | grad^2 | fixed (alpha, lambda) |
| assd   | cross-entropy      | grad^2 | percentile rule + PTN |
| lfssd  | mean ||logits||^2  | |grad| | percentile rule + PTN |
| potion | mean ||logits||    | |grad| | percentile rule + PTN |
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from potion.core.io import sha256_tensors
from potion.evaluation.backdoor import autocast_for
from potion.unlearning.cache import cached_tensors, entry_path, indices_digest
from potion.unlearning.dampening import RatioPool, dampen_, snapshot
from potion.unlearning.importance import compute_importance, importance_parameters
from potion.unlearning.ptn import PTNResult, PTNSchedule, evaluate_candidate, ptn_search
from potion.unlearning.ptn_guard import AccuracyLoss, guard_step
from potion.unlearning.registry import MethodOutput, register, sync
from potion.unlearning.synthesis import (
    SynthesisResult,
    invert_additive,
    patch_present,
    synthesize_additive,
    synthesize_forget,
)
from potion.unlearning.task import UnlearnTask

log = logging.getLogger("potion.ssd")


def importance_pair(task: UnlearnTask, *, loss: str, power: int, batch_size: int, retain_samples: int | None = None,
                    cache: bool = True, order: str = "by_label"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Omega_r and Omega_f (each from the content-addressed cache when possible) plus timing info.

    The keyword arguments are the ``method.importance`` block (checked by the config schema).
    """
    retain = task.retain_idx
    if retain_samples is not None and retain_samples < retain.numel():
        gen = torch.Generator().manual_seed(task.seed)
        retain = retain[torch.randperm(retain.numel(), generator=gen)[:retain_samples]].sort().values
    weights = sha256_tensors(task.model.state_dict())
    common = {"weights": weights, "data": task.train.fingerprint, "loss": loss, "power": power,
              "batch_size": batch_size, "device": task.device.type, "order": f"{order}-{task.seed}"}

    def run(idx: torch.Tensor) -> Callable[[], dict[str, torch.Tensor]]:
        # |batch gradient| (unlike a per-sample sum) depends on what shares a batch, so the order is explicit:
        # "by_label" groups samples of one (given) label per batch, "shuffled" mixes them (seeded).
        if order == "by_label":
            gen = torch.Generator().manual_seed(task.seed)
            idx = idx[torch.randperm(idx.numel(), generator=gen)]
            idx = idx[torch.sort(task.train.labels[idx], stable=True).indices]
        batches = task.batches(idx, batch_size, shuffle=order != "by_label", seed=task.seed)
        return lambda: compute_importance(task.model, batches, loss=loss, power=power, what="retain importance",
                                          total=math.ceil(idx.numel() / batch_size))

    sync(task.device)
    t0 = time.perf_counter()
    imp_r, hit_r = cached_tensors(entry_path("importance", **common, idx=indices_digest(retain)), run(retain), cache)
    forget_key = {"idx": indices_digest(task.forget_idx)}
    if task.extra_forget is not None:
        forget_key["extra"] = sha256_tensors({"x": task.extra_forget[0], "y": task.extra_forget[1]})
    imp_f, hit_f = cached_tensors(
        entry_path("importance", **common, **forget_key),
        lambda: compute_importance(task.model, task.forget_batches(batch_size), loss=loss, power=power,
                                   what="forget importance"), cache)
    sync(task.device)
    info = {"importance_seconds": time.perf_counter() - t0, "importance_cache_hit": float(hit_r and hit_f),
            "retain_importance_samples": int(retain.numel())}
    dev = task.device
    return ({k: v.to(dev) for k, v in imp_r.items()}, {k: v.to(dev) for k, v in imp_f.items()}, info)


def forget_accuracy_fn(task: UnlearnTask, criterion: str, estimate: SynthesisResult | None = None,
                       cache: bool = False) -> tuple[ForgetCriterion, dict[str, Any]]:
    """forget_acc as PTN watches it (a :class:`ForgetCriterion`): the forget set prepared once on the device.

    Discovered and synthetic samples are two groups, and a step qualifies only when EVERY group has
    fallen to rho of its own start: hundreds of synthetic samples must never outvote the real discovered
    ones (a search that stops on the synthetic set alone can leave the discovered sample at the target).
    The value returned is the worst group's accuracy relative to its start, times the pooled start
    accuracy, so with one group it is that group's accuracy and ``forget_acc <= rho * a0`` keeps its meaning.
    ``exclude_natural_target`` (or a trigger ``estimate`` recovered by synthesis): discovered samples still
    called the target once the trigger is taken out are target-class by nature (clean-label poison, or a
    target-class image that drew the patch) and are left out: a small discovered group (rho * n_f < 1) would
    otherwise make PTN push a real target-class image out of its class (on the quickstart's digits, 7
    discovered with one true 0: acc_drop 12.3). Without a single target (all-to-all) nothing is left out.
    """
    idx = task.forget_idx
    info: dict[str, Any] = {}
    natural = None
    if task.attack.target is not None and (criterion == "exclude_natural_target" or estimate is not None):
        natural = natural_target_mask(task, estimate, cache)
        info["forget_natural_target"] = int(natural.sum())
    if natural is not None and bool(natural.all()):
        if task.extra_forget is None:
            log.warning("every discovered sample looks like a natural target sample; PTN watches all of them")
            natural = None
        else:
            log.info("every discovered sample is target-class by nature (clean-label poison): PTN watches the "
                     "synthetic samples only")
    if natural is not None:
        idx = idx[~natural]
    groups: list[tuple[torch.Tensor, torch.Tensor]] = []
    if idx.numel():
        groups.append((task.train.normalised(idx, task.device), task.train.labels[idx].to(task.device)))
    if task.extra_forget is not None:  # synthetic samples are poison of known non-target classes
        groups.append((task.extra_forget[0].to(task.device), task.extra_forget[1].to(task.device)))
    info["criterion_samples"] = int(sum(g[1].numel() for g in groups))
    info["criterion_groups"] = len(groups)
    return ForgetCriterion.measure_start(task.model, groups), info


CRITERION_CHUNK = 128  # samples per forward while measuring; a step is decided after each chunk


@torch.no_grad()
def chunk_hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many of ``x`` (one chunk) ``model`` (in eval mode) predicts as ``y``."""
    with autocast_for(x.device):
        return int((model(x).argmax(1) == y).sum())


@dataclass
class ForgetCriterion:
    """PTN's watched value (:func:`grouped_forget_acc`) over groups of prepared forget samples.

    Calling it measures every sample; :meth:`within` measures only as far as a PTN step's decision needs.
    Both walk the same chunks, so they count the same hits.
    """

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    start: list[int]
    total: int
    chunk: int = CRITERION_CHUNK

    @classmethod
    def measure_start(cls, model: nn.Module, groups: list[tuple[torch.Tensor, torch.Tensor]],
                      chunk: int = CRITERION_CHUNK) -> ForgetCriterion:
        """The criterion with each group's hits on the undampened ``model`` as its start."""
        crit = cls(groups, [0] * len(groups), max(1, sum(int(y.numel()) for _, y in groups)), chunk)
        crit.start = [crit.group_hits(model, g) for g in range(len(groups))]
        return crit

    def group_hits(self, model: nn.Module, g: int) -> int:
        model.eval()
        x, y = self.groups[g]
        step = self.chunk
        return sum(chunk_hits(model, x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step))

    def __call__(self, model: nn.Module) -> float:
        return grouped_forget_acc([self.group_hits(model, g) for g in range(len(self.groups))], self.start,
                                  self.total)

    def within(self, model: nn.Module, threshold: float) -> float:
        """The value when it is <= ``threshold``; NaN as soon as the chunks measured prove it above.

        The value never falls as hits are added (every hit count only raises its group's ratio), so hits
        counted so far, with the rest taken as zero, give a lower bound: once that exceeds the threshold the
        step cannot qualify. Smallest group first (with one discovered sample: one forward decides most steps).
        """
        model.eval()
        hits = [0] * len(self.groups)
        for g in sorted(range(len(self.groups)), key=lambda i: self.groups[i][1].numel()):
            x, y = self.groups[g]
            for i in range(0, x.shape[0], self.chunk):
                hits[g] += chunk_hits(model, x[i:i + self.chunk], y[i:i + self.chunk])
                if not grouped_forget_acc(hits, self.start, self.total) <= threshold:
                    return math.nan
        return grouped_forget_acc(hits, self.start, self.total)


def grouped_forget_acc(hits: list[int], start: list[int], total: int | None = None) -> float:
    """PTN's watched value for groups of forget samples (discovered, synthetic): the worst group's accuracy
    relative to its start (``start``: hits of the undampened model), times the pooled start accuracy.

    ``value <= rho * value(start)`` then holds exactly when every group fell to rho of its own start; with one
    group it is simply that group's accuracy (``hits / total``). A group that started at zero is done.
    """
    total = total if total is not None else max(1, sum(start))
    if len(hits) == 1:
        return hits[0] / total
    ratios = [h / s0 for h, s0 in zip(hits, start, strict=True) if s0 > 0]
    return max(ratios, default=0.0) * sum(start) / total


@torch.no_grad()
def _predict_batches(model: nn.Module, x: torch.Tensor, bs: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, x.shape[0], bs)]) if x.shape[0] else \
        torch.zeros(0, dtype=torch.long, device=x.device)


def natural_target_mask(task: UnlearnTask, estimate: SynthesisResult | None = None, cache: bool = False
                        ) -> torch.Tensor:
    """Discovered samples that are the target class by nature, found without labels.

    The trigger is located from the discovered samples (``estimate``, or a patch window found as trigger
    synthesis does); taking it out (filling the window with clean images' pixels, or subtracting an additive
    estimate) leaves the host image, and a sample the poisoned model still assigns to the target is
    target-class by nature: PTN cannot and should not push it away from its label. No trigger found ->
    nothing excluded. ``cache``: the window search is read from (and written to) the content-addressed cache.
    """
    idx = task.forget_idx
    x = task.train.normalised(idx, task.device)
    target = task.attack.target
    pool = task.retain_idx[task.train.labels[task.retain_idx] != target]
    gen = torch.Generator().manual_seed(task.seed + 29)
    probes = task.train.normalised(pool[torch.randperm(pool.numel(), generator=gen)[:256]], task.device)
    found = estimate
    if found is None:
        found = cached_synthesis(task, "natural-target", cache, lambda: ({}, synthesize_forget(
            task.model, x[:64], probes, target)))[1]
    if found is None:
        return torch.zeros(idx.numel(), dtype=torch.bool)
    return (_predict_batches(task.model, found.remove_from(x, probes)) == target).cpu()


def with_synthesis(task: UnlearnTask, synthesis: Mapping[str, Any] | None, cache: bool = False
                   ) -> tuple[UnlearnTask, dict[str, Any], SynthesisResult | None]:
    """The task with synthetic forget samples from the recovered trigger, when ``synthesis.enabled``.

    A patch is located when at most ``max_discovered`` samples were found (beyond that the discovered set
    itself is enough); with at least ``additive_min_discovered`` samples and no patch, an image-wide
    additive trigger is estimated instead; with fewer, and no patch, one is inverted (``invert_steps`` > 0).
    All-to-all attacks have no single target class: only a patch window is located there, judged by how
    many probe predictions it changes, and the synthetic samples carry their triggered predictions.
    ``cache``: the outcome is read from (and written to) the content-addressed cache, so the jobs of a PTN
    sweep search the windows once.
    """
    s = synthesis  # the method.synthesis block; None: synthesise nothing (later iterative rounds)
    if s is None or not s["enabled"]:
        return task, {}, None
    info, result = cached_synthesis(task, "synthesis", cache, lambda: _synthesize(task, s), settings=dict(s))
    if result is None:
        if not info.get("synth_patch_found") and any(_searches(task, s)):
            log.info("trigger synthesis: no patch window%s flips enough predictions; using the discovered samples "
                     "only", "" if task.attack.target is None else " or additive estimate")
        return task, info, None
    if result.additive:
        how = "estimate" if task.discovery.n_f >= int(s["additive_min_discovered"]) else "inversion"
        log.info("trigger synthesis: an image-wide additive %s from %d samples flips %.1f%% of probes", how,
                 task.discovery.n_f, 100 * result.flip_rate)
    else:
        log.info("trigger synthesis: %dx%d window at (%d, %d) flips %.1f%% of probes", result.size, result.size,
                 result.row, result.col, 100 * result.flip_rate)
    return replace(task, extra_forget=(result.images, result.labels)), info, result


def cached_synthesis(task: UnlearnTask, kind: str, cache: bool,
                     compute: Callable[[], tuple[dict[str, Any], SynthesisResult | None]], **parts: Any
                     ) -> tuple[dict[str, Any], SynthesisResult | None]:
    """(info, recovered trigger) of a window search on ``task``, from the cache when ``cache`` and an entry exists.

    The key holds all the search reads: the weights, the data, the discovered and retain indices (probes are
    drawn from the latter), the seed, the attack's target and the device, plus ``parts`` (the settings).
    """
    def entry() -> dict[str, torch.Tensor]:
        info, result = compute()
        flat = {f"info.{k}": torch.tensor(v, dtype=torch.int64) if type(v) is int
                else torch.tensor(float(v), dtype=torch.float64) for k, v in info.items()}
        return flat if result is None else {**flat, **result.to_tensors()}

    if not cache:  # no key to build (it hashes the weights)
        tensors = entry()
    else:
        tensors, _ = cached_tensors(entry_path(
            kind, weights=sha256_tensors(task.model.state_dict()), data=task.train.fingerprint,
            forget=indices_digest(task.forget_idx), retain=indices_digest(task.retain_idx), seed=task.seed,
            target=task.attack.target, device=task.device.type, **parts), entry)
    info = {k.removeprefix("info."): v.item() for k, v in tensors.items() if k.startswith("info.")}
    return info, SynthesisResult.from_tensors(tensors, task.device)


def _searches(task: UnlearnTask, s: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether synthesis looks for a patch window (few discovered samples) and for an image-wide estimate."""
    n_f = task.discovery.n_f
    additive_ok = bool(s["additive"]) and n_f >= int(s["additive_min_discovered"]) and task.attack.target is not None
    return n_f <= int(s["max_discovered"]), additive_ok


def _synthesize(task: UnlearnTask, s: Mapping[str, Any]) -> tuple[dict[str, Any], SynthesisResult | None]:
    """The window search of :func:`with_synthesis` (its info and recovered trigger)."""
    n = int(s["samples"])
    target = task.attack.target
    labels = task.train.labels[task.retain_idx]
    pool = task.retain_idx if target is None else task.retain_idx[labels != target]
    gen = torch.Generator().manual_seed(task.seed + 17)
    probe_idx = pool[torch.randperm(pool.numel(), generator=gen)[:n]]
    probes = task.train.normalised(probe_idx, task.device)
    forget_x, _ = task.forget_tensors()
    min_flip = float(s["min_flip_rate"])
    small, additive_ok = _searches(task, s)
    if not small and not additive_ok:  # enough discovered samples and nothing image-wide to estimate
        return {"synth_samples": 0}, None
    result = None
    if small:
        result = synthesize_forget(task.model, forget_x[:64], probes, target, sizes=tuple(s["sizes"]),
                                   min_flip_rate=min_flip)
    elif additive_ok and patch_present(task.model, forget_x[:64], probes, target, sizes=tuple(s["sizes"]),
                                       min_flip_rate=min_flip):
        return {"synth_samples": 0, "synth_patch_found": 1.0}, None  # a patch, and enough discovered
    if result is None and additive_ok:
        ref_idx = task.retain_idx[torch.randperm(task.retain_idx.numel(), generator=gen)[:max(n, 1000)]]
        reference = task.train.normalised(ref_idx, task.device)
        result = synthesize_additive(task.model, forget_x, reference, probes, target, min_flip_rate=min_flip)
    elif result is None and small and bool(s["additive"]) and int(s["invert_steps"]) > 0 and target is not None:
        result = invert_additive(task.model, forget_x[:64], probes, target, steps=int(s["invert_steps"]),
                                 min_flip_rate=min_flip, seed=task.seed + 23)
    return ({"synth_samples": 0} if result is None else result.summary()), result


def ptn_criterion(task: UnlearnTask, criterion: str) -> str:
    """What PTN's stopping test watches: ``auto`` leaves out discovered samples that are target-class by nature,
    tested per sample from the pixels (:func:`natural_target_mask`), whenever the attack has one target; it
    watches all of them for an all-to-all attack, or where the user declared ``attack.clean_label=false``."""
    if criterion == "auto":
        natural = task.attack.target is not None and task.attack.clean_label is not False
        return "exclude_natural_target" if natural else "all"
    return criterion


def run_ptn(task: UnlearnTask, *, loss: str, power: int, importance: Mapping[str, Any], ptn: Mapping[str, Any],
            synthesis: Mapping[str, Any] | None, lam: float = 1.0, criterion_task: UnlearnTask | None = None,
            estimate: SynthesisResult | None = None) -> MethodOutput:
    """Importances once, then the PTN search over percentile-rule dampenings of the model (in place).

    ``criterion_task``: PTN's stopping test watches that task's forget set instead of ``task``'s (the
    iterative method: importances from discovered + suspected samples, stopping on the discovered ones).
    ``ptn.fixed_step``: evaluate only this step k instead of searching; a list of steps (how the PTN
    sweeper's candidate jobs call it) evaluates each from the undampened model and leaves the last.
    """
    cache = bool(importance.get("cache", True))
    task, synth_info, found = with_synthesis(task, synthesis, cache)
    estimate = found or estimate  # ``estimate``: a trigger recovered earlier (iterative rounds synthesise once)
    imp_r, imp_f, info = importance_pair(task, loss=loss, power=power, **importance)
    criterion = ptn_criterion(task, str(ptn["criterion"]))
    crit_task = task if criterion_task is None else replace(criterion_task, extra_forget=task.extra_forget)
    forget_acc, crit_info = forget_accuracy_fn(crit_task, criterion, estimate, cache)
    schedule = PTNSchedule.from_config(ptn, task.discovery.n_f, task.num_train)
    sync(task.device)
    t0 = time.perf_counter()
    model = task.model
    a0 = forget_acc(model)
    names = [n for n, _ in importance_parameters(model)]
    originals = snapshot(model, names)
    fixed = ptn["fixed_step"]
    candidates_only = isinstance(fixed, (list, tuple))  # the PTN sweeper's candidate jobs: no guard, no choice
    limit = ptn.get("max_acc_loss")
    guard = (AccuracyLoss.of(task, int(ptn["guard_samples"]), task.seed + 31)
             if limit is not None and not candidates_only else None)
    # built once, when a step is dampened from the originals outside the search
    pool = functools.cache(lambda: RatioPool.build(imp_r, imp_f))
    if fixed is not None:  # given candidates (the PTN sweeper's jobs: a list; its final run: one step)
        steps = fixed if candidates_only else [fixed]
        cands = [evaluate_candidate(int(k), schedule, pool(), model, originals, imp_r, imp_f, forget_acc, lam)
                 for k in steps]
        threshold = schedule.rho * a0
        result = PTNResult(a0, threshold, cands[-1].qualifies(threshold), cands[-1], cands)
    else:
        decide = forget_acc.within if ptn.get("measure", "decisive") == "decisive" else None
        result = ptn_search(model, originals, imp_r, imp_f, schedule, forget_acc, a0, lam, decide=decide,
                            reuse_unchanged=True)
    guard_info: dict[str, float] = {}
    if guard is not None:
        result, guard_info = guard_step(result, float(limit), guard, model, lambda k: evaluate_candidate(
            k, schedule, pool(), model, originals, imp_r, imp_f, forget_acc, lam))
    sync(task.device)
    search_seconds = time.perf_counter() - t0
    diagnostics = {**result.summary(), **guard_info, **crit_info, **synth_info, "importance_loss": loss,
                   "ptn_criterion": criterion,
                   "importance_cache_hit": info["importance_cache_hit"],
                   "retain_importance_samples": info["retain_importance_samples"]}
    if guard_info.get("ptn_guarded"):
        diagnostics["ptn_note"] = (f"the guard kept step k={result.chosen.step}: step k="
                                   f"{int(guard_info['ptn_guard_from_step'])} got more than {limit}% of the clean "
                                   "retain images the model classified right wrong")
    elif not result.reached:
        diagnostics["ptn_note"] = (f"rho={schedule.rho} never met in {schedule.max_steps} steps; "
                                   "returned the last step's model")
    return MethodOutput(model, diagnostics, {"importance_seconds": info["importance_seconds"],
                                             "search_seconds": search_seconds}, result.trajectory_rows())


@register("ssd", heal_ok=True, dampens=True)
def ssd(task: UnlearnTask, *, alpha: float, lam: float, importance: Mapping[str, Any]) -> MethodOutput:
    """Selective Synaptic Dampening with a fixed alpha and lambda (cross-entropy, grad^2)."""
    imp_r, imp_f, info = importance_pair(task, loss="ce", power=2, **importance)
    t0 = time.perf_counter()
    names = [n for n, _ in importance_parameters(task.model)]
    res = dampen_(task.model, snapshot(task.model, names), imp_r, imp_f, float(alpha), float(lam))
    return MethodOutput(task.model, {"dampened_share": res.share, "alpha": float(alpha), "lam": float(lam)},
                        {"importance_seconds": info["importance_seconds"],
                         "search_seconds": time.perf_counter() - t0})


@register("assd", ptn=True, heal_ok=True, dampens=True)
def assd(task: UnlearnTask, *, importance: Mapping[str, Any], ptn: Mapping[str, Any], synthesis: Mapping[str, Any]
          ) -> MethodOutput:
    """Adaptive SSD: cross-entropy grad^2 importances, percentile rule, PTN."""
    return run_ptn(task, loss="ce", power=2, importance=importance, ptn=ptn, synthesis=synthesis)


@register("lfssd", ptn=True, heal_ok=True, dampens=True)
def lfssd(task: UnlearnTask, *, importance: Mapping[str, Any], ptn: Mapping[str, Any], synthesis: Mapping[str, Any]
          ) -> MethodOutput:
    """Label-free SSD: squared logit norm, |grad|, percentile rule, PTN."""
    return run_ptn(task, loss="logit_sqnorm", power=1, importance=importance, ptn=ptn, synthesis=synthesis)


def potion_loss(task: UnlearnTask, loss: str) -> str:
    """Potion's importance loss for this attack: ``auto`` is the paper's label-free, outlier-resistant logit norm
    for an all-to-one backdoor, and cross-entropy against the poisoned labels for an all-to-all one.

    With one target every discovered sample pulls its logits the same way and the norm's gradient marks the
    backdoor's parameters; when each sample goes to a label of its own (y -> y + 1) the norm's gradient mixes the
    class features every clean image also uses, while cross-entropy against the mapped labels singles out the
    mapping (CIFAR all-to-all, 10 %: acc_drop 6.1 -> 0.2 at the same asr; docs/results.md, *Attacks beyond the
    patch*).
    """
    if loss == "auto":
        return "ce" if task.attack.all_to_all else "logit_norm"
    return loss


@register("potion", ptn=True, heal_ok=True, dampens=True)
def potion(task: UnlearnTask, *, importance: Mapping[str, Any], ptn: Mapping[str, Any], synthesis: Mapping[str, Any],
           loss: str) -> MethodOutput:
    """Potion: outlier-resistant logit-norm |grad| importances (``loss``: see :func:`potion_loss`), percentile rule,
    PTN."""
    return run_ptn(task, loss=potion_loss(task, loss), power=1, importance=importance, ptn=ptn, synthesis=synthesis)


@register("none", changes_model=False)
def none(task: UnlearnTask) -> MethodOutput:
    """The poisoned model, unchanged (the reference row of every table)."""
    return MethodOutput(task.model, {}, {})
