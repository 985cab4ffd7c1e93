"""The training-based baselines of the Goel et al. grid (method.md §4): retrain, EU-k, CF-k, SCRUB, Bad Teacher.

Every method is "SGD over a stream of losses": it builds a generator that yields one ``(kind, loss)`` per
optimizer step (the forward pass happens inside the generator), and :func:`train_steps`, the one training loop
of this module, runs SGD with the learning-rate schedule over it. Common to all methods:

* Deterministic given ``task.seed``: the whole method runs under a forked, seeded torch RNG
  (re-initialisation, augmentation) and every batch stream gets its own seed derived from it.
* The last model is returned; no checkpoint is selected on the test set (method.md §4). The poisoned
  ``task.model`` is never modified: methods train a copy (or a fresh model).
* SGD arguments not given fall back to the training run's ``train`` section (``task.train_cfg``).
* Layers for EU-k / CF-k are the modules that own parameters directly, in registration order (forward order
  for the bundled models). While only the last k train, batch-norm layers in the frozen part stay in eval
  mode, so their running statistics do not drift.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.config.compose import check_field
from potion.config.schema import Train
from potion.core.errors import ConfigError
from potion.core.progress import Progress
from potion.core.schedule import total_steps_for, warmup_linear_decay
from potion.evaluation.backdoor import autocast_for
from potion.unlearning.registry import MethodOutput, register, sync
from potion.unlearning.task import UnlearnTask

# Fallbacks when the training run's ``train`` section lacks a key (method.md §2 values).
_TRAIN_DEFAULTS = {"lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "batch_size": 512,
                   "warmup": 0.01, "label_smoothing": 0.0}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # torch's public batch-norm layers
_LOSS_WINDOW = 20  # final losses are averaged over the last this many steps of each kind


# --------------------------------------------------------------------------------------- settings


def _train_value(task: UnlearnTask, key: str) -> Any:
    """The training run's ``train.<key>`` (what a method argument left null falls back to), checked by the schema.

    A run folder's config.yaml comes from disk, so its value is checked here, where it is used.
    """
    value = task.train_cfg.get(key)
    if value is None and key in _TRAIN_DEFAULTS:
        return _TRAIN_DEFAULTS[key]
    try:
        check_field(Train, key, value, f"train.{key}")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the training run's value, used where method.{key} is null)") from None
    return value


@dataclass(frozen=True)
class SGDSettings:
    """Optimizer and learning-rate schedule of one method run."""

    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    warmup: float
    schedule: str

    def summary(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": float(self.nesterov), "warmup": self.warmup, "schedule": self.schedule}


def _given_or_run(task: UnlearnTask, key: str, value: Any) -> Any:
    """A method argument (checked by the schema), or the training run's value when it is null."""
    return _train_value(task, key) if value is None else value


def sgd_settings(task: UnlearnTask, *, schedule: str, lr: float | None = None, momentum: float | None = None,
                 weight_decay: float | None = None, nesterov: bool | None = None, warmup: float | None = None
                 ) -> SGDSettings:
    """SGD settings: the given values, else (None) the training run's (``task.train_cfg``)."""
    momentum = float(_given_or_run(task, "momentum", momentum))
    nesterov = bool(_given_or_run(task, "nesterov", nesterov))
    if nesterov and momentum == 0:  # one of the two came from the training run: the schema could not see both
        raise ConfigError("method.nesterov=true needs method.momentum > 0 (one of them is the training run's; "
                          "set both)")
    return SGDSettings(float(_given_or_run(task, "lr", lr)), momentum,
                       float(_given_or_run(task, "weight_decay", weight_decay)), nesterov,
                       float(_given_or_run(task, "warmup", warmup)), schedule)


def batch_size_for(task: UnlearnTask, batch_size: int | None) -> int:
    """The method's batch size, or the training run's when it is null."""
    return int(_given_or_run(task, "batch_size", batch_size))


def _factory(task: UnlearnTask, method: str) -> Callable[[], nn.Module]:
    if not callable(task.model_factory):
        raise ConfigError(f"method {method!r} needs a fresh model of the poisoned model's architecture, "
                          "but the task has no model_factory")
    return task.model_factory  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- the shared loop


@contextmanager
def seeded(task: UnlearnTask) -> Iterator[None]:
    """Run under the global torch RNG seeded with ``task.seed``; the caller's RNG state is restored afterwards."""
    devices = []
    if task.device.type == "cuda":
        devices = [task.device.index if task.device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(task.seed))
        yield


def stream(task: UnlearnTask, idx: torch.Tensor, batch_size: int, steps: int, *, augment: bool, seed: int,
           what: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps`` shuffled batches of ``idx`` (reshuffled every pass), from ``task.batches``."""
    n = int(idx.numel())
    if n == 0:
        raise ConfigError(f"the {what} set is empty: nothing to train on")
    per_pass = math.ceil(n / batch_size)
    passes = max(1, math.ceil(steps / per_pass))
    return islice(task.batches(idx, batch_size, shuffle=True, augment=augment, seed=seed, epochs=passes), steps)


def stream_seed(task: UnlearnTask, which: int) -> int:
    """A distinct, reproducible shuffling seed per batch stream of one method run."""
    return int(task.seed) * 1_000_003 + 7919 * which + 1


@dataclass
class LoopResult:
    """What the loop saw: optimizer steps per loss kind and the mean of each kind's last losses."""

    steps: dict[str, int]
    final_loss: dict[str, float]
    seconds: float


def train_steps(model: nn.Module, params: Sequence[nn.Parameter], losses: Iterator[tuple[str, torch.Tensor]],
                total_steps: int, sgd: SGDSettings, device: torch.device, what: str = "training") -> LoopResult:
    """THE training loop: one SGD step (with the schedule) per ``(kind, loss)`` drawn from ``losses``.

    ``losses`` computes its forward passes lazily; ``total_steps`` sizes the schedule (and caps the
    loop). The caller sets the model's train/eval modes beforehand. ``what`` names the loop on the
    progress line (:mod:`potion.core.progress`), which also shows the last loss.
    """
    opt = torch.optim.SGD(list(params), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay,
                          nesterov=sgd.nesterov)
    factor = warmup_linear_decay(total_steps, sgd.warmup) if sgd.schedule == "linear" else (lambda step: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    recent: dict[str, deque[torch.Tensor]] = defaultdict(lambda: deque(maxlen=_LOSS_WINDOW))
    counts: dict[str, int] = defaultdict(int)
    bar = Progress(what, total_steps)
    sync(device)
    t0 = time.perf_counter()
    for kind, loss in islice(losses, total_steps):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent[kind].append(loss.detach())
        counts[kind] += 1
        bar.advance(note=lambda kind=kind: f"{kind} loss {float(recent[kind][-1]):.4f}")
    sync(device)
    bar.finish()
    seconds = time.perf_counter() - t0
    final = {k: float(torch.stack(list(v)).float().mean()) for k, v in recent.items()}
    return LoopResult(dict(counts), final, seconds)


def finished(model: nn.Module) -> nn.Module:
    """Eval mode and every parameter trainable again, so later code sees a normal model."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def _output(model: nn.Module, result: LoopResult, sgd: SGDSettings, t_start: float, device: torch.device,
            **extra: Any) -> MethodOutput:
    sync(device)
    diagnostics: dict[str, Any] = {"iterations": sum(result.steps.values())}
    diagnostics.update({f"{k}_steps": v for k, v in result.steps.items()})
    diagnostics.update({f"final_{k}_loss": v for k, v in result.final_loss.items()})
    diagnostics.update({f"sgd_{k}": v for k, v in sgd.summary().items()})
    diagnostics.update(extra)
    return MethodOutput(finished(model), diagnostics,
                        {"train_seconds": time.perf_counter() - t_start, "loop_seconds": result.seconds})


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with autocast_for(x.device):
        return model(x).float()


@torch.no_grad()
def _teacher_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _logits(model, x)


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, per-sample mean, times T^2."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


def cross_entropy_losses(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                         label_smoothing: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Plain supervised training on (poisoned-label) batches."""
    for x, y in batches:
        yield "retain", F.cross_entropy(_logits(model, x), y, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------- layers


def parameterised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly (Conv, Linear, BatchNorm, ...), in registration order."""
    return [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


def last_layers(model: nn.Module, k: int) -> list[tuple[str, nn.Module]]:
    """The last ``k`` parameterised layers (all of them for k = -1); a ConfigError when there are fewer."""
    layers = parameterised_layers(model)
    if k == -1:
        return layers
    if k > len(layers):
        raise ConfigError(f"method.k={k}: the model has only {len(layers)} parameterised layers "
                          f"(use k <= {len(layers)}, or k=-1 for all)")
    return layers[-k:]


def freeze_all_but(model: nn.Module, trainable: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Freeze every parameter outside ``trainable``; return the trainable ones (for the optimizer)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in trainable for p in m.parameters(recurse=False)]
    for p in params:
        p.requires_grad_(True)
    return params


def train_mode_partial(model: nn.Module, trainable: Sequence[nn.Module]) -> None:
    """Train mode, except batch-norm layers outside ``trainable`` (frozen: their running stats stay put)."""
    model.train()
    keep = {id(m) for m in trainable}
    for m in model.modules():
        if isinstance(m, BATCH_NORMS) and id(m) not in keep:
            m.eval()


def _train_last_layers(task: UnlearnTask, model: nn.Module, layers: list[tuple[str, nn.Module]], iterations: int,
                       sgd: SGDSettings, batch_size: int, augment: bool, label_smoothing: float, t_start: float,
                       what: str, **extra: Any) -> MethodOutput:
    """EU-k and CF-k: cross-entropy on the retain set, only ``layers`` trainable."""
    modules = [m for _, m in layers]
    params = freeze_all_but(model, modules)
    train_mode_partial(model, modules)
    batches = stream(task, task.retain_idx, batch_size, iterations, augment=augment, seed=stream_seed(task, 0),
                     what="retain")
    result = train_steps(model, params, cross_entropy_losses(model, batches, label_smoothing), iterations, sgd,
                         task.device, what)
    return _output(model, result, sgd, t_start, task.device, trainable_layers=len(layers),
                   trainable_params=sum(p.numel() for p in params), retain_samples=int(task.retain_idx.numel()),
                   **extra)


# --------------------------------------------------------------------------------------- methods


def retain_without(task: UnlearnTask, extra_forget: list[int] | None) -> torch.Tensor:
    """The retain set minus ``extra_forget`` (training indices also to exclude, e.g. newly discovered poison)."""
    if extra_forget is None:
        return task.retain_idx
    bad = [i for i in extra_forget if not i < task.num_train]  # >= 0: the schema; the size: only the data knows
    if bad:
        raise ConfigError(f"method.extra_forget: {bad[:5]} are not training indices in [0, {task.num_train - 1}]")
    drop = torch.zeros(task.num_train, dtype=torch.bool)
    drop[torch.tensor(list(extra_forget), dtype=torch.long)] = True
    retain = task.retain_idx
    return retain[~drop[retain]]


@register("retrain", trains=True)
def retrain(task: UnlearnTask, *, iterations: int | None, lr: float | None, momentum: float | None,
            weight_decay: float | None, nesterov: bool | None, warmup: float | None, batch_size: int | None,
            label_smoothing: float | None, schedule: str, augment: bool, extra_forget: list[int] | None
            ) -> MethodOutput:
    """Exact unlearning (EU): a fresh model trained from scratch on the retain set with the run's own schedule.

    ``iterations=None`` uses as many optimizer steps as the training run: ``train.iterations`` if set,
    else ``train.epochs`` passes over the retain set. ``extra_forget`` also removes those training
    indices from the retain set (for "discover, then retrain").
    """
    sgd = sgd_settings(task, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                       warmup=warmup, schedule=schedule)
    bs = batch_size_for(task, batch_size)
    smoothing = float(_given_or_run(task, "label_smoothing", label_smoothing))
    retain = retain_without(task, extra_forget)
    if iterations is None:
        run_iters, epochs = _train_value(task, "iterations"), _train_value(task, "epochs")
        if run_iters is None and epochs is None:
            raise ConfigError("method.iterations: the training run's train section has neither iterations nor "
                              "epochs; set method.iterations")
        iterations = total_steps_for(int(retain.numel()), bs, run_iters, epochs)
    factory = _factory(task, "retrain")
    sync(task.device)
    t_start = time.perf_counter()
    with seeded(task):
        model = factory().to(task.device)
        model.train()
        batches = stream(task, retain, bs, iterations, augment=augment, seed=stream_seed(task, 0), what="retain")
        result = train_steps(model, list(model.parameters()), cross_entropy_losses(model, batches, smoothing),
                             iterations, sgd, task.device, "retrain")
    return _output(model, result, sgd, t_start, task.device, retain_samples=int(retain.numel()),
                   extra_forget=len(extra_forget) if extra_forget is not None else 0)


def _last_layer_settings(task: UnlearnTask, batch_size: int | None, label_smoothing: float | None, **sgd: Any
                         ) -> tuple[SGDSettings, int, float]:
    """The settings eu_k and finetune share, null ones from the training run: (SGD, batch size, smoothing)."""
    return (sgd_settings(task, **sgd), batch_size_for(task, batch_size),
            float(_given_or_run(task, "label_smoothing", label_smoothing)))


@register("eu_k", trains=True)
def eu_k(task: UnlearnTask, *, k: int, iterations: int, lr: float | None, momentum: float | None,
         weight_decay: float | None, nesterov: bool | None, warmup: float | None, batch_size: int | None,
         label_smoothing: float | None, schedule: str, augment: bool) -> MethodOutput:
    """EU-k: re-initialise the last k parameterised layers (from a fresh model), train only them on the retain set.

    The rest of the poisoned model is frozen (its batch-norm layers in eval mode). SGD settings
    default to the training run's (lr included).
    """
    sgd, bs, smoothing = _last_layer_settings(task, batch_size, label_smoothing, lr=lr, momentum=momentum,
                                              weight_decay=weight_decay, nesterov=nesterov, warmup=warmup,
                                              schedule=schedule)
    factory = _factory(task, "eu_k")
    sync(task.device)
    t_start = time.perf_counter()
    with seeded(task):
        model = copy.deepcopy(task.model)
        layers = last_layers(model, k)
        fresh = dict(factory().named_modules())
        for name, module in layers:
            if name not in fresh or type(fresh[name]) is not type(module):
                raise ConfigError(f"eu_k: the model factory's model has no layer {name!r} like the poisoned model's")
            module.load_state_dict(fresh[name].state_dict())  # parameters and buffers (batch-norm statistics)
        del fresh
        return _train_last_layers(task, model, layers, iterations, sgd, bs, augment, smoothing, t_start, "eu_k", k=k)


@register("finetune", trains=True)
def finetune(task: UnlearnTask, *, k: int, iterations: int, lr: float | None, momentum: float | None,
             weight_decay: float | None, nesterov: bool | None, warmup: float | None, batch_size: int | None,
             label_smoothing: float | None, schedule: str, augment: bool) -> MethodOutput:
    """Catastrophic forgetting (CF-k): fine-tune the last k parameterised layers (k=-1: all) on the retain set.

    Frozen layers' batch-norm statistics stay put (eval mode). conf/method/finetune.yaml sets lr 0.025
    (method.md §4); null SGD settings are the training run's.
    """
    sgd, bs, smoothing = _last_layer_settings(task, batch_size, label_smoothing, lr=lr, momentum=momentum,
                                              weight_decay=weight_decay, nesterov=nesterov, warmup=warmup,
                                              schedule=schedule)
    sync(task.device)
    t_start = time.perf_counter()
    with seeded(task):
        model = copy.deepcopy(task.model)
        layers = last_layers(model, k)
        return _train_last_layers(task, model, layers, iterations, sgd, bs, augment, smoothing, t_start, "finetune",
                                  k=k)


@register("scrub", trains=True)
def scrub(task: UnlearnTask, *, alpha: float, gamma: float, temperature: float, max_steps: int, iterations: int,
          lr: float, momentum: float, weight_decay: float, nesterov: bool, warmup: float | None, schedule: str,
          batch_size: int | None, forget_batch_size: int | None, augment: bool) -> MethodOutput:
    """SCRUB (Kurmanji et al.): a student (copy of the poisoned model) and the frozen poisoned model as teacher.

    ``iterations`` min steps on the retain set minimise alpha * KL(teacher || student) + gamma * CE
    (poisoned labels); ``max_steps`` max steps on the forget set minimise -KL(teacher || student). The
    KL is taken at ``temperature`` (scaled by T^2). One max step precedes every
    ``max(1, iterations // max_steps)``-th min step until ``max_steps`` are done, so the max steps
    fall in the first part of the run and the rest is min steps only. One optimizer for both (SGD,
    constant lr by default). The last model is returned.
    """
    sgd = sgd_settings(task, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                       warmup=warmup, schedule=schedule)
    bs = batch_size_for(task, batch_size)
    fbs = bs if forget_batch_size is None else forget_batch_size
    every = max(1, iterations // max_steps) if max_steps else 0
    sync(task.device)
    t_start = time.perf_counter()
    with seeded(task):
        teacher = task.model.eval()
        student = copy.deepcopy(task.model).train()
        retain = stream(task, task.retain_idx, bs, iterations, augment=augment, seed=stream_seed(task, 0),
                        what="retain")
        forget = stream(task, task.forget_idx, fbs, max_steps, augment=augment, seed=stream_seed(task, 1),
                        what="forget") if max_steps else iter(())

        def losses() -> Iterator[tuple[str, torch.Tensor]]:
            done = 0
            for i, (x, y) in enumerate(retain):
                if done < max_steps and i % every == 0:
                    xf, _ = next(forget)
                    done += 1
                    yield "max", -kl_to_teacher(_logits(student, xf), _teacher_logits(teacher, xf), temperature)
                s = _logits(student, x)
                yield "min", (alpha * kl_to_teacher(s, _teacher_logits(teacher, x), temperature)
                              + gamma * F.cross_entropy(s, y))

        result = train_steps(student, list(student.parameters()), losses(), iterations + max_steps, sgd, task.device,
                             "scrub")
    return _output(student, result, sgd, t_start, task.device, alpha=alpha, gamma=gamma, temperature=temperature,
                   max_every=every)


@register("bad_teacher", trains=True)
def bad_teacher(task: UnlearnTask, *, iterations: int, lr: float, temperature: float, forget_share: float | None,
                batch_size: int | None, momentum: float | None, weight_decay: float | None, nesterov: bool | None,
                warmup: float | None, schedule: str, augment: bool) -> MethodOutput:
    """Bad Teacher (Chundawat et al.): distil from the poisoned model on retain samples, from a random model on forget.

    Each step forwards one mixed batch: ``batch_size - f`` retain samples and ``f`` forget samples,
    drawn from separate shuffled streams, with ``f = max(1, round(batch_size * forget_share))``.
    ``forget_share=None`` takes the forget set's share of the training set, ``n_f / (n_f + n_r)``,
    i.e. what uniformly mixed batches hold on average. The loss is the per-sample KL from the
    student to its teacher's softened distribution (competent teacher = frozen poisoned model for
    retain samples, incompetent teacher = a randomly initialised model for forget samples), averaged
    over the whole batch, i.e. the two parts weighted by their sample counts (times T^2).
    """
    bs = batch_size_for(task, batch_size)
    if bs < 2:  # method.batch_size >= 2 is the schema's; this is the training run's batch size
        raise ConfigError(f"train.batch_size={bs} (of the training run): bad_teacher needs batches of at least 2 "
                          "(retain and forget samples); set method.batch_size")
    n_f, n_r = int(task.forget_idx.numel()), int(task.retain_idx.numel())
    share = n_f / max(1, n_f + n_r) if forget_share is None else forget_share
    f_bs = min(bs - 1, max(1, int(round(bs * share))))
    sgd = sgd_settings(task, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                       warmup=warmup, schedule=schedule)
    factory = _factory(task, "bad_teacher")
    sync(task.device)
    t_start = time.perf_counter()
    with seeded(task):
        competent = task.model.eval()
        incompetent = factory().to(task.device).eval()
        student = copy.deepcopy(task.model).train()
        retain = stream(task, task.retain_idx, bs - f_bs, iterations, augment=augment, seed=stream_seed(task, 0),
                        what="retain")
        forget = stream(task, task.forget_idx, f_bs, iterations, augment=augment, seed=stream_seed(task, 1),
                        what="forget")

        def losses() -> Iterator[tuple[str, torch.Tensor]]:
            for (xr, _), (xf, _) in zip(retain, forget, strict=False):
                targets = torch.cat([_teacher_logits(competent, xr), _teacher_logits(incompetent, xf)])
                yield "distill", kl_to_teacher(_logits(student, torch.cat([xr, xf])), targets, temperature)

        result = train_steps(student, list(student.parameters()), losses(), iterations, sgd, task.device,
                             "bad_teacher")
    return _output(student, result, sgd, t_start, task.device, temperature=temperature, forget_share=share,
                   forget_per_batch=f_bs)
