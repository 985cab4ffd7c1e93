"""unlearn.py's job: trained run -> discovery -> method -> evaluation -> run folder -> MLflow run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from potion.config.compose import (
    compose_config,
    identity_hash,
    method_arguments,
    model_kwargs,
    to_dict,
    train_overrides,
    validate_unlearn_config,
)
from potion.core.errors import ConfigError
from potion.core.io import save_tensors, sha256_tensors
from potion.core.schedule import cpu_threads
from potion.data.defender import TrainingView, defender_view
from potion.data.discovery import Discovery, discover
from potion.data.poisoned import PoisonedData, load_data, poison
from potion.evaluation import metrics
from potion.evaluation.backdoor import evaluate_backdoor, logits_of, model_device, predict
from potion.models import build_model
from potion.pipelines.lifecycle import RunOutputs, reuse_finished, run_lifecycle
from potion.pipelines.reference import is_reference, reference_config
from potion.pipelines.run_folders import (
    PLAN,
    TrainedRun,
    check_out_dir,
    check_plan_fits,
    claim_run_dir,
    load_trained_run,
    read_summary,
    remove_stale_temp_files,
    run_lock,
)
from potion.pipelines.study_cells import current_commit, logged_cell
from potion.pipelines.train import run_training, train_run_dir
from potion.tracking import naming
from potion.tracking.runs import FolderRun, unlearn_folder_run
from potion.tracking.tracker import Tracker, download_run_artifacts, resolve_tracking_uri
from potion.unlearning.attack import infer_attack
from potion.unlearning.cache import cached_tensors, entry_path
from potion.unlearning.methods import get_method, method_info
from potion.unlearning.registry import run_timed
from potion.unlearning.suspects import find_suspects, suspects_summary, write_suspects_csv
from potion.unlearning.task import UnlearnTask

log = logging.getLogger("potion.unlearn")


def resolve_device(trainer_cfg: Any) -> torch.device:
    """cuda when the trainer asks for a GPU and one is there, else CPU (with a warning if a GPU was asked for)."""
    acc = str(trainer_cfg.get("accelerator", "cpu")) if trainer_cfg is not None else "cpu"
    if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if acc in ("gpu", "cuda"):
        log.warning("trainer.accelerator=%s but no GPU is visible; running on CPU", acc)
    return torch.device("cpu")


def trained_inputs(cfg: DictConfig) -> tuple[TrainedRun, Discovery]:
    """The training run an unlearning config names (trained first if only its overrides are given) and the
    discovered share of its poison."""
    run = load_trained_run(resolve_train_run(cfg.get("train_run"), cfg.get("logger"), cfg.get("train")))
    d = cfg.discovery
    return run, discover(run.plan, share=d.get("share"), count=d.get("count"), seed=int(d.get("seed", cfg.seed)))


def make_task(model: torch.nn.Module, view: TrainingView, discovery: Discovery, device: torch.device, seed: int,
              model_cfg: Any, train_cfg: Any = None, attack: Any = None) -> UnlearnTask:
    """What a method receives (the one place it is built): the model on ``device``, eval mode, the training set as
    a defender holds it, the facts of the attack (``attack``: the declared block; the rest inferred from the
    discovered samples' labels) and a factory of fresh models of its architecture (``model_cfg``)."""
    facts = infer_attack(view.labels[discovery.forget_idx], to_dict(attack) if attack is not None else None,
                         view.num_classes)
    return UnlearnTask(model=model.to(device).eval(), train=view, discovery=discovery, attack=facts, device=device,
                       seed=seed, model_factory=lambda: build_model(str(model_cfg["name"]), view.num_classes,
                                                                    view.channels, **model_kwargs(model_cfg)),
                       train_cfg=to_dict(train_cfg) if train_cfg is not None else {})


def resolve_train_run(spec: str | None, logger_cfg: Any, train: Any = None) -> Path:
    """A run folder path, ``mlflow:<run id>`` (fetched into runs/mlflow/<id>), or the run of a train config.

    ``train`` (train.py overrides as a mapping, ``{experiment: cpu_bench, poison: {count: 100}}``, or a list)
    finds the finished training run of that config, training it first if needed: a grid of unlearning
    jobs over ``+train.poison.count=100,500,1000`` reuses one trained model per poison size.
    """
    if spec in (None, "", "???") and train:
        return Path(run_training(compose_config("train", train_overrides(train, logger_cfg)))["run_dir"])
    if spec in (None, "", "???"):
        raise ConfigError("train_run: required; give a training run folder (printed by train.py), mlflow:<run id>, "
                          "or train overrides (+train.experiment=quickstart)")
    spec = str(spec)
    if not spec.startswith("mlflow:"):
        return Path(spec)
    run_id = spec.split(":", 1)[1]
    dst = Path("runs") / "mlflow" / run_id
    if read_summary(dst) is None:
        uri = resolve_tracking_uri(logger_cfg.get("tracking_uri") if logger_cfg is not None else None)
        for name in ("config.yaml", "poison_plan.json", "model.safetensors", "summary.json"):
            download_run_artifacts(uri, run_id, name, dst)
    return dst


def unlearn_run_dir(cfg: DictConfig, run: TrainedRun) -> tuple[Path, str]:
    """runs/unlearn/<method>-<hash> where the hash covers this config and the training run's identity."""
    key = identity_hash({**to_dict(cfg), "train_run": run.summary.get("config_hash", str(run.path))})
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir)), key
    return Path("runs") / "unlearn" / f"{cfg.method.name}-{key}", key


def run_unlearning(cfg: DictConfig, parent_run_id: str | None = None, tracker: Tracker | None = None
                   ) -> dict[str, Any]:
    """Heal the training run's model with the configured method; return the summary (also on disk).

    ``parent_run_id`` makes the MLflow run a child of that run. ``tracker``: log to this tracker (its run
    already started elsewhere, e.g. a :class:`~potion.tracking.tracker.RecordingTracker` in a PTN sweep's final
    job) instead of starting one from ``cfg.logger``; it gets the run's tags and its final status.
    """
    method_fn = get_method(str(cfg.method.name))
    validate_unlearn_config(cfg)  # static values fail here, before the training run is read
    run, discovery = trained_inputs(cfg)
    run_dir, key = unlearn_run_dir(cfg, run)
    if cfg.get("skip_logged") and tracker is None:  # a study resumed elsewhere: this cell may be in its store
        logged = logged_cell(cfg.get("logger"), unlearn_spec(cfg, run, discovery, key).experiment, key)
        if logged is not None:
            return logged
    with run_lock(run_dir):  # a second identical command waits, then reuses the result
        return _unlearn_locked(cfg, run, discovery, method_fn, run_dir, key, parent_run_id, tracker)


def _unlearn_locked(cfg: DictConfig, run: TrainedRun, discovery: Any, method_fn: Any, run_dir: Path, key: str,
                    parent_run_id: str | None, tracker: Tracker | None) -> dict[str, Any]:
    fresh = check_out_dir(run_dir, "unlearn", key, bool(cfg.get("force", False)))
    done = read_summary(run_dir)
    spec = unlearn_spec(cfg, run, discovery, key)
    if done is not None and not fresh and done.get("config_hash") == key:
        # a sweep's final job (tracker given): the sweeper logs the folder if its store lacks the run
        spec.params.update(naming.resolved_settings(done))
        return reuse_finished(naming.logger_for(cfg.logger, spec.experiment), run_dir, done, spec,
                              parent_run_id=parent_run_id, tracker=tracker)
    bundle = load_data(run.cfg.dataset)  # before the MLflow run: a plan that does not fit leaves no FAILED run
    check_plan_fits(run.plan, bundle, run.path / PLAN)
    with run_lifecycle(naming.logger_for(cfg.logger, spec.experiment), run_dir, run_name=spec.run_name,
                       tags=spec.tags, parent_run_id=parent_run_id, tracker=tracker, config=cfg) as outputs:
        return _unlearn(cfg, run, bundle, discovery, method_fn, (key, fresh), outputs, spec.params)


def unlearn_spec(cfg: DictConfig, run: TrainedRun, discovery: Discovery, key: str) -> FolderRun:
    """How this unlearning run reads in MLflow (potion.tracking.naming): experiment, name, tags, params."""
    study = naming.study_name(run.cfg)
    grid, overrides = naming.hydra_job()
    method = str(cfg.method.name)
    tags = {**naming.study_tags(naming.UNLEARN, study), naming.METHOD: method, naming.CONFIG_HASH: key,
            **naming.train_link_tags(run.summary), "potion.train_run_dir": str(Path(run.path).resolve()),
            **naming.grid_tags(grid), **({naming.CODE_COMMIT: commit} if (commit := current_commit()) else {})}
    name = naming.unlearn_run_name(to_dict(cfg), run.cfg, discovery.n_f, run.plan.count,
                                   naming.grid_extras(overrides))
    params = naming.unlearn_params(cfg, run.cfg, discovery.n_f, run.plan.count)
    return unlearn_folder_run(naming.experiment_name(cfg.get("logger"), study), name, tags, params)


def _unlearn(cfg: DictConfig, run: TrainedRun, bundle: Any, discovery: Any, method_fn: Any,
             identity: tuple[str, bool], outputs: RunOutputs, params: dict[str, Any]) -> dict[str, Any]:
    key, fresh = identity
    run_dir, tracker = outputs.folder, outputs.tracker
    torch.set_num_threads(cpu_threads())
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.get("trainer"))
    data = poison(bundle, run.plan, run.poison_images)
    view = defender_view(data)  # all a method sees; ``data`` (the plan) stays with evaluation
    model = model_before_copy(run, data, device)
    bs = int(cfg.eval_batch_size)
    before_logits = poisoned_logits(model, data, view, bs)
    before = _before_metrics(before_logits, data, data.wanted_test_labels())
    task = make_task(model, view, discovery, device, int(cfg.seed), run.cfg.model, run.cfg.train, cfg.get("attack"))
    forget_acc_before = task.forget_accuracy(model)
    method_args = method_arguments(cfg.method)
    tracker.log_params({**params, **task.attack.summary()})
    outputs.uses_data(bundle, run.cfg.dataset, context="unlearning", train_run_id=run.summary.get("mlflow_run_id"))

    task.meter.samples = 0  # what the method streams from here on
    out, unlearn_seconds = run_timed(method_fn, task, method_args)
    passes = task.meter.samples / task.num_train

    t1 = time.perf_counter()
    healed_model = out.model.eval()
    poisoned_model = model_before_copy(run, data, device)
    after = evaluate_backdoor(healed_model, data.bundle.test.images, data.bundle.test.labels, data.normalizer,
                              data.trigger, data.wanted_test_labels(), bs)
    result = {
        **after,
        **{f"{k}_before": v for k, v in before.items()},
        "healed": metrics.healed(after["poison_acc"], before["poison_acc"], before["clean_acc"]),
        **attainable(run, data, after["poison_acc"], before["poison_acc"], str(cfg.get("reference", "auto")),
                     device, bs),
        "acc_drop": metrics.acc_drop(before["clean_acc"], after["clean_acc"]),
        "forget_acc": task.forget_accuracy(healed_model),
        "forget_acc_before": forget_acc_before,
        "poisoned_train_acc": poisoned_train_accuracy(healed_model, data, bs),
        "poisoned_train_acc_before": poisoned_train_accuracy(poisoned_model, data, bs),
        "unlearn_seconds": unlearn_seconds,
        "data_passes": passes,  # training-set samples the method streamed, in passes over the training set
        **{k: float(v) for k, v in out.timings.items()},
    }
    ranking = None
    if cfg.get("suspects", {}).get("enabled", True) and method_info(str(cfg.method.name)).changes_model:
        ranking, sig = find_suspects(poisoned_model, healed_model, view, discovery.retain_idx, discovery.forget_idx,
                                     target=task.attack.target, signature=bool(cfg.suspects.get("signature", True)),
                                     target_only=bool(cfg.suspects.get("target_only", True)), seed=int(cfg.seed),
                                     batch_size=bs, before_logits=before_logits["train"])
        result.update(suspects_summary(ranking, data.poison_mask))
        result["suspect_signature_found"] = float(sig is not None)
    result["eval_seconds"] = time.perf_counter() - t1
    numeric = {k: float(v) for k, v in out.diagnostics.items() if isinstance(v, (int, float, bool))}
    notes = {k: v for k, v in out.diagnostics.items() if not isinstance(v, (int, float, bool))}

    claim_run_dir(run_dir, "unlearn", key, fresh)
    remove_stale_temp_files(run_dir)  # what a killed writer left (we hold the run lock)
    if cfg.get("save_weights", True):
        outputs.add_model(save_tensors(run_dir / "model.safetensors", healed_model.state_dict()), run.cfg.model,
                          data.num_classes, data.channels)
    if ranking is not None:
        outputs.add(write_suspects_csv(run_dir / "suspects.csv", ranking, data.bundle.train.paths))
    if naming.fixed_step(cfg.method) is None:  # one given step is no search: a one-point plot would say nothing
        outputs.trajectory(out.trajectory, float(out.diagnostics.get("ptn_threshold", 0.0)),
                           title=f"PTN: {cfg.method.name}, n_f={discovery.n_f}")
    summary = {
        **{k: metrics.finite_or_none(v) for k, v in result.items()}, **numeric, **notes,
        **task.attack.summary(), "method": str(cfg.method.name), "n_f": discovery.n_f, "n_p": run.plan.count,
        "target": run.plan.target,
        "config_hash": key, "run_dir": str(run_dir), "train_run": str(run.path), "device": device.type,
        "mlflow_run_id": tracker.run_id, "train_mlflow_run_id": run.summary.get("mlflow_run_id"),
    }
    tracker.log_params(naming.resolved_settings({**result, **numeric, **notes}))
    return outputs.complete(summary, naming.measurements({**result, **numeric}, to_dict(cfg.method)),
                            {f"potion.{k}": str(v) for k, v in notes.items()})


def attainable(run: TrainedRun, data: PoisonedData, poison_acc_after: float, poison_acc_before: float,
               mode: str, device: torch.device, bs: int) -> dict[str, float]:
    """healed_attainable against the clean reference model (``reference``: auto = if trained, train, off)."""
    if mode == "off" or is_reference(run.cfg):
        return {}
    ref_cfg = reference_config(run.cfg)
    ref_dir = train_run_dir(ref_cfg)
    done = read_summary(ref_dir)
    if (done is None or done.get("config_hash") != identity_hash(ref_cfg)) and mode == "train":
        ref_dir = Path(run_training(ref_cfg)["run_dir"])
        done = read_summary(ref_dir)
    if done is None or done.get("config_hash") != identity_hash(ref_cfg):
        log.info("no clean reference model yet (reference=train trains it: %s); healed_attainable left out", ref_dir)
        return {}
    ref_model = load_trained_run(ref_dir).build_model(data.num_classes, data.channels).to(device).eval()
    ref = evaluate_backdoor(ref_model, data.bundle.test.images, data.bundle.test.labels, data.normalizer,
                            data.trigger, data.wanted_test_labels(), bs)
    return {"poison_acc_reference": ref["poison_acc"], "clean_acc_reference": ref["clean_acc"],
            "healed_attainable": metrics.healed_attainable(poison_acc_after, poison_acc_before, ref["poison_acc"])}


def poisoned_logits(model: torch.nn.Module, data: PoisonedData, view: TrainingView, bs: int
                    ) -> dict[str, torch.Tensor]:
    """The poisoned model's logits on the test split (clean, triggered) and the training set as stored (``view``).

    Cached by content (weights, data, trigger, training view, device): every unlearning cell of a grid on the
    same model reuses them for its before-metrics and suspect scores instead of recomputing them.
    """
    device = model_device(model)
    path = entry_path("logits", weights=sha256_tensors(model.state_dict()), data=data.bundle.fingerprint,
                       trigger=data.plan.trigger.to_dict(), view=view.fingerprint,
                       norm=[list(data.bundle.mean), list(data.bundle.std)], device=device.type)

    def compute() -> dict[str, torch.Tensor]:
        test = data.bundle.test.images
        return {"test_clean": logits_of(model, test, data.normalizer, batch_size=bs),
                "test_triggered": logits_of(model, test, data.normalizer, data.trigger, batch_size=bs),
                "train": logits_of(model, view.images, view.normalizer, batch_size=bs)}

    return cached_tensors(path, compute)[0]


def _before_metrics(logits: dict[str, torch.Tensor], data: PoisonedData, target: int | torch.Tensor
                    ) -> dict[str, float]:
    """The poisoned model's clean_acc / poison_acc / asr from its (cached) test logits."""
    labels = data.bundle.test.labels
    triggered = logits["test_triggered"].argmax(1)
    return {"clean_acc": metrics.accuracy(logits["test_clean"].argmax(1), labels),
            "poison_acc": metrics.accuracy(triggered, labels),
            "asr": metrics.attack_success_rate(triggered, labels, target)}


def model_before_copy(run: TrainedRun, data: PoisonedData, device: torch.device) -> torch.nn.Module:
    """A fresh copy of the poisoned model (methods may change the task's model in place)."""
    return run.build_model(data.num_classes, data.channels).to(device).eval()


def poisoned_train_accuracy(model: torch.nn.Module, data: PoisonedData, bs: int) -> float:
    """Accuracy on all n_p poisoned training images with the trigger, against their true labels."""
    idx = torch.tensor(data.plan.indices, dtype=torch.long)
    preds = predict(model, data.bundle.train.images[idx], data.normalizer, data.trigger, batch_size=bs)
    return metrics.accuracy(preds, torch.tensor(data.plan.true_labels))

