"""train.py's job: config -> poisoned data -> Lightning fit -> run folder -> MLflow run.

Results land on disk first (weights, plan, config, then summary.json last); tracking comes second and
its failures never lose the run.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from potion.config.compose import identity_hash, model_kwargs, to_dict, validate_train_config
from potion.core import interrupt, progress
from potion.core.errors import ConfigError
from potion.core.interrupt import Interrupted
from potion.core.io import load_tensors, save_tensors
from potion.core.precision import resolve_auto
from potion.core.schedule import cpu_threads, total_steps_for
from potion.data.adversarial import pgd_away
from potion.data.augment import Normalizer
from potion.data.batches import TensorBatches
from potion.data.defender import defender_view
from potion.data.poisoned import PoisonedData, kind_needs_images, load_data, plan_from_config, poison
from potion.data.triggers import kind_of
from potion.evaluation.backdoor import evaluate_backdoor
from potion.models import build_model
from potion.pipelines.lifecycle import RunOutputs, reuse_finished, run_lifecycle
from potion.pipelines.reference import canonical_clean, reference_config
from potion.pipelines.run_folders import (
    CHECKPOINTS,
    CONFIG,
    PLAN,
    POISON_IMAGES,
    WEIGHTS,
    check_out_dir,
    check_plan_fits,
    claim_run_dir,
    load_trained_run,
    read_plan,
    read_summary,
    remove_stale_temp_files,
    run_lock,
    write_config,
    write_plan,
)
from potion.tracking import naming
from potion.tracking.runs import train_folder_run
from potion.tracking.tracker import NullTracker

if TYPE_CHECKING:  # Lightning is imported where a model is fitted: unlearning and sweep jobs start without it
    import pytorch_lightning as pl

log = logging.getLogger("potion.train")


def train_run_dir(cfg: DictConfig) -> Path:
    """The run folder: ``out_dir`` if set, else runs/train/<name>-<config hash> (same config, same folder)."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    return Path("runs") / "train" / f"{cfg.name}-{identity_hash(cfg)}"


def is_secondary_rank() -> bool:
    """True in a process a distributed launcher started besides rank 0 (Lightning's DDP children, torchrun,
    SLURM tasks): read from the environment, since the tracker starts before the Trainer knows its rank."""
    return any(int(os.environ.get(k) or 0) for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume, or reuse) the poisoned model the config describes; return its summary.

    The run folder is locked for the whole call: a second identical command waits and then reuses the
    result. A folder holding another config is refused unless ``force=true``, which trains from scratch.
    """
    validate_train_config(cfg)
    cfg = canonical_clean(cfg)  # poison=none under any experiment = that recipe's clean reference
    cfg, why = resolve_auto(cfg)
    if why:
        log.info("trainer: precision=%s channels_last=%s (%s)", cfg.trainer.precision, cfg.trainer.channels_last, why)
    run_dir = train_run_dir(cfg)
    config_hash = identity_hash(cfg)
    if kind_of(str(cfg.poison.trigger.kind)).surrogate and not (run_dir / POISON_IMAGES).is_file():
        log.info("%s needs a clean surrogate: the clean reference model of this recipe", cfg.poison.trigger.kind)
        run_training(reference_config(cfg))  # trained once (or reused) before this run's folder is claimed
    secondary = is_secondary_rank()  # DDP ranks > 0 follow rank 0, which holds the lock and claims the folder
    with nullcontext() if secondary else run_lock(run_dir):
        fresh = not secondary and check_out_dir(run_dir, "train", config_hash, bool(cfg.get("force", False)))
        done = read_summary(run_dir)
        spec = train_folder_run(cfg, config_hash, (done or {}).get("n_p"))
        if done is not None and not fresh and done.get("config_hash") == config_hash:
            log.info("already finished: %s (force=true to retrain)", run_dir)
            if secondary:
                return {**done, "reused": True}
            spec.tags["potion.run_dir"] = str(run_dir.resolve())  # a live run sets it once it has claimed the folder
            return reuse_finished(cfg.logger, run_dir, done, spec)
        resume = _resume_checkpoint(cfg, run_dir, fresh)
        with run_lifecycle(naming.logger_for(cfg.logger, spec.experiment), run_dir, run_name=spec.run_name,
                           tags=spec.tags, tracker=NullTracker() if secondary else None) as outputs:
            return _train(cfg, config_hash, outputs, fresh, resume)


def _resume_checkpoint(cfg: DictConfig, run_dir: Path, fresh: bool) -> tuple[Path, dict[str, Any]] | None:
    """The checked last checkpoint to resume from, or None (none there, resume=false, or a fresh start)."""
    ckpt = run_dir / CHECKPOINTS / "last.ckpt"
    if fresh or not cfg.get("resume", True) or not ckpt.is_file():
        return None
    from potion.pipelines.lightning_module import read_resume_checkpoint

    return ckpt, read_resume_checkpoint(ckpt)


def _train(cfg: DictConfig, config_hash: str, outputs: RunOutputs, fresh: bool,
           resume: tuple[Path, dict[str, Any]] | None) -> dict[str, Any]:
    import pytorch_lightning as pl

    from potion.pipelines.lightning_module import PoisonTrainingModule, StopOnSignal, check_checkpoint_fits

    run_dir, tracker = outputs.folder, outputs.tracker
    torch.set_num_threads(cpu_threads())
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    bundle = load_data(cfg.dataset)
    outputs.uses_data(bundle, cfg.dataset)  # the MLflow dataset input (digest: the data cache's fingerprint)
    plan = plan_from_config(bundle, cfg.poison)
    plan_path = run_dir / PLAN
    if plan_path.is_file() and not fresh:  # a resumed run must keep the plan it started with
        old = read_plan(plan_path)
        check_plan_fits(old, bundle, plan_path)
        if old.to_dict() != plan.to_dict():
            log.warning("poison plan in %s differs from the config's; keeping the saved one", run_dir)
            plan = old
    if fresh:  # from scratch: not even the attack's stored images of an earlier run are reused
        (run_dir / POISON_IMAGES).unlink(missing_ok=True)
    data = poison(bundle, plan, _poison_images(cfg, bundle, plan, run_dir))
    model = build_model(cfg.model.name, data.num_classes, data.channels, **model_kwargs(cfg.model))
    if not is_secondary_rank():
        claim_run_dir(run_dir, "train", config_hash, fresh)
        for folder in (run_dir, run_dir / CHECKPOINTS):  # what a killed writer left (we hold the run lock)
            remove_stale_temp_files(folder)
    write_config(run_dir, cfg)
    write_plan(run_dir, plan)
    tracker.log_params(naming.train_params(cfg, plan.count))
    tracker.set_tags({"potion.run_dir": str(run_dir.resolve())})

    t = cfg.train
    tr = cfg.trainer
    world = 1 if tr.devices in (None, "auto") or int(tr.devices) <= 0 else int(tr.devices)
    steps = total_steps_for(len(bundle.train), int(t.batch_size), t.iterations, t.epochs, world)
    module = PoisonTrainingModule(
        model, data.normalizer, data.trigger, lr=float(t.lr), momentum=float(t.momentum),
        weight_decay=float(t.weight_decay), total_steps=steps, warmup=float(t.warmup), nesterov=bool(t.nesterov),
        label_smoothing=float(t.label_smoothing), crop_padding=int(t.crop_padding), flip=bool(t.flip),
        channels_last=bool(tr.channels_last), seed=int(cfg.seed),
    )
    ckpt = run_dir / CHECKPOINTS / "last.ckpt"
    if resume is not None:
        check_checkpoint_fits(resume[1], module, resume[0])
        log.info("resuming from %s", resume[0])
    trainer = _make_trainer(cfg, run_dir, steps, data, tracker, resume, StopOnSignal(ckpt))
    loader = _train_loader(data, cfg, trainer)
    start = time.perf_counter()
    _fit(trainer, module, loader, None if resume is None else str(resume[0]), ckpt)
    train_seconds = time.perf_counter() - start
    if not trainer.is_global_zero:  # DDP: the other ranks trained with rank 0, which alone writes and tracks
        return {"run_dir": str(run_dir), "global_rank": trainer.global_rank}

    model = module.model.eval()
    weights = save_tensors(run_dir / WEIGHTS, model.state_dict())
    outputs.add_model(weights, cfg.model, data.num_classes, data.channels)  # + logged model
    for name in (PLAN, CONFIG):
        outputs.add(run_dir / name)
    final = evaluate_backdoor(model, bundle.test.images, bundle.test.labels, data.normalizer, data.trigger,
                              data.wanted_test_labels(), int(t.eval_batch_size))
    summary = {
        **final, "train_seconds": train_seconds, "steps": steps, "epochs": steps / max(1, len(loader)),
        "n_p": plan.count, "target": plan.target, "config_hash": config_hash, "run_dir": str(run_dir),
        "mlflow_run_id": tracker.run_id, "resumed": resume is not None, "dataset_fingerprint": bundle.fingerprint,
        "num_classes": data.num_classes, "channels": data.channels,
    }
    return outputs.complete(summary, {**final, "train_seconds": train_seconds})


def _poison_images(cfg: DictConfig, bundle: Any, plan: Any, run_dir: Path) -> torch.Tensor | None:
    """The label-consistent attack's PGD-hardened images: from the run folder, or made with the reference model."""
    if not kind_needs_images(plan):
        return None
    path = run_dir / POISON_IMAGES
    if path.is_file():
        return load_tensors(path)["images"]
    ref_dir = train_run_dir(reference_config(cfg))
    surrogate = load_trained_run(ref_dir).build_model(bundle.num_classes, bundle.channels).eval()
    idx = torch.tensor(plan.indices, dtype=torch.long)
    s = plan.trigger
    log.info("label-consistent attack: PGD (eps %g/255, %d steps) on %d target-class images", s.eps, s.pgd_steps,
             plan.count)
    images = pgd_away(surrogate, bundle.train.images[idx], bundle.train.labels[idx],
                      Normalizer(bundle.mean, bundle.std), eps=s.eps, steps=s.pgd_steps, step=s.pgd_step)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"images": images})
    return images


def _fit(trainer: pl.Trainer, module: pl.LightningModule, loader: Any, resume_from: str | None, ckpt: Path) -> None:
    """Lightning's fit, stopped cleanly by SIGTERM/SIGINT (checkpoint at the step, then :class:`Interrupted`)."""
    with interrupt.deferred():
        try:
            trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_from, weights_only=True)
        except SystemExit:  # Lightning's own SIGTERMException: the signal came after this step's check
            signum = interrupt.pending()
            if signum is None:
                raise
            raise Interrupted(signum, f"last checkpoint {ckpt}") from None


def _make_trainer(cfg: DictConfig, run_dir: Path, steps: int, data: PoisonedData, tracker: Any,
                  resume: tuple[Path, dict[str, Any]] | None, stop: pl.Callback) -> pl.Trainer:
    import pytorch_lightning as pl

    from potion.pipelines.lightning_module import AtomicCheckpointIO, EpochMetricsCallback

    t, tr = cfg.train, cfg.trainer
    every = t.checkpoint_every_n_steps
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=run_dir / CHECKPOINTS, save_last=True, save_top_k=0,
        every_n_train_steps=int(every) if every else None, save_on_train_epoch_end=True,
    )
    evaluate = None
    if t.epoch_eval:
        n = min(int(t.epoch_eval_samples), len(data.bundle.test))
        # a seeded random subset: test splits are often stored class by class
        pick = torch.randperm(len(data.bundle.test), generator=torch.Generator().manual_seed(0))[:n]
        imgs, labels = data.bundle.test.images[pick], data.bundle.test.labels[pick]
        wanted = data.plan.wanted(labels)

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            return evaluate_backdoor(model, imgs, labels, data.normalizer, data.trigger, wanted,
                                     int(t.eval_batch_size))

    def sink(values: dict[str, float], epoch: int) -> None:
        log.info("epoch %d: %s", epoch, "  ".join(f"{k}={v:.4f}" for k, v in values.items()))
        tracker.log_metrics(values, step=epoch)

    callbacks = [checkpoint, EpochMetricsCallback(sink, evaluate), stop]
    more = to_dict(tr.get("lightning") or {})  # plain values: Lightning gets no OmegaConf containers
    try:
        return pl.Trainer(
            accelerator=tr.accelerator, devices=tr.devices, strategy=tr.strategy, precision=tr.precision,
            max_steps=steps, max_epochs=-1, logger=False, callbacks=callbacks, plugins=[AtomicCheckpointIO(resume)],
            enable_progress_bar=progress.enabled(tr.progress_bar), enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, deterministic=bool(tr.deterministic),
            benchmark=bool(tr.get("benchmark", False)), default_root_dir=str(run_dir), log_every_n_steps=50, **more)
    except TypeError as exc:  # an argument name Lightning does not take: only the pass-through block can hold one
        if not more:
            raise
        raise ConfigError(f"trainer.lightning={more}: pl.Trainer refused it ({exc})") from None


def _train_loader(data: PoisonedData, cfg: DictConfig, trainer: pl.Trainer) -> TensorBatches:
    device = trainer.strategy.root_device
    images, flags = data.bundle.train.images, data.train_flags
    if cfg.train.trigger_in_files:  # data poisoning: the files hold the trigger, so augmentation moves it
        images, flags = defender_view(data).images, torch.zeros(len(data.train_labels), dtype=torch.bool)
    if device.type == "cuda":  # keep the whole uint8 data set on the GPU: no host->device copy per batch
        images = images.to(device)
    return TensorBatches(
        images, data.train_labels.to(images.device), flags.to(images.device),
        batch_size=int(cfg.train.batch_size), shuffle=True, seed=int(cfg.seed), drop_last=False,
        rank=trainer.global_rank, world_size=trainer.world_size,
    )
