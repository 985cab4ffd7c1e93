"""Heal your own model: weights this project did not train, poisoned files already in the data, a discovered list.

``python -m potion.heal checkpoint=<weights> dataset.path=<image folder> discovered=<list> model=<arch>``

The inputs are what a practitioner has: a plain state dict (``.pt``/``.pth`` read with ``weights_only=True``, or
``.safetensors``), an image folder taken exactly as it is on disk (the poisoned files carry the trigger in their
pixels), and the list of poisoned files found so far: the forget set, every other training file the retain set.
What is known of the attack can be declared (``attack.*``); the rest is inferred from the discovered files' folders.
A method of unlearn.py heals the model, and the other training files are ranked as suspects.

Outputs (in ``out_dir``): ``healed.pt`` or ``healed.safetensors`` (the input's format and key names), ``report.md``,
``suspects.csv``, ``ptn_trajectory.png``/``.csv`` (PTN methods) and, written last, ``summary.json``. A known trigger
(``trigger={kind: patch, size: 3, color: [1, 1, 1]}``) adds the attack success rate and poison accuracy.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potion.config.compose import method_arguments, model_kwargs, to_dict, validate_heal_config
from potion.core.io import atomic_write_text, save_tensors
from potion.core.schedule import cpu_threads
from potion.data.defender import view_of_bundle
from potion.data.discovery import Discovery
from potion.data.poison import Trigger
from potion.data.poisoned import load_data
from potion.data.sources import DatasetBundle
from potion.evaluation import metrics
from potion.evaluation.backdoor import evaluate_backdoor, predict
from potion.models import build_model
from potion.pipelines.heal_inputs import (
    claimed_out_dir,
    complement_discovery,
    default_out_dir,
    evaluation_trigger,
    heal_identity,
    load_checkpoint,
    load_weights,
    read_discovered,
    refuse_out_dir_in_data,
    resolve_discovered,
    trigger_spec,
)
from potion.pipelines.heal_report import format_report
from potion.pipelines.lifecycle import RunOutputs, run_lifecycle
from potion.pipelines.next_steps import NEXT_LIST, config_args, next_commands, write_next_list
from potion.pipelines.unlearn import make_task, resolve_device
from potion.tracking import naming
from potion.unlearning.methods import get_method
from potion.unlearning.registry import run_timed
from potion.unlearning.suspects import SuspectRanking, find_suspects, write_suspects_csv
from potion.unlearning.task import UnlearnTask

log = logging.getLogger("potion.heal")

TOP_SUSPECTS = 10
REPAIR_DATA = {"crop_padding": 0, "flip": False}  # no augmentation in potion_iterative's repair (recipe unknown)
ALL_TO_ALL = "several (all-to-all)"  # what the report names as the target class when the discovered files have many


def heal(cfg: Any, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Heal the checkpoint with the discovered list; write the out folder and return the summary.

    ``command``: the overrides of the ``python -m potion.heal`` command line (the report's next-steps commands
    are built from them); None (a call from Python) rebuilds the inputs from the config.
    """
    d = to_dict(cfg)
    validate_heal_config(d)
    refuse_out_dir_in_data(d)
    method_fn = get_method(str(d["method"]["name"]))
    checkpoint, list_path = Path(str(d["checkpoint"])), str(d["discovered"])  # both required by the schema
    state = load_checkpoint(checkpoint)
    entries = read_discovered(list_path)
    trigger = trigger_spec(d.get("trigger"))
    dataset = {k: (None if v == "???" else v) for k, v in (d.get("dataset") or {}).items()}
    bundle = load_data(dataset)
    forget_idx = resolve_discovered(entries, bundle, list_path, str(dataset.get("path")))
    seed = int(d.get("seed", 0))
    view = view_of_bundle(bundle)  # the files exactly as they are: nothing pasted anywhere
    known = evaluation_trigger(bundle, trigger)
    discovery = complement_discovery(forget_idx, len(bundle.train), seed)

    model_cfg = d["model"]

    def factory() -> nn.Module:
        return build_model(str(model_cfg["name"]), view.num_classes, view.channels, **model_kwargs(model_cfg))

    torch.set_num_threads(cpu_threads())
    torch.manual_seed(seed)
    device = resolve_device(d.get("trainer"))
    model = factory()
    prefix = load_weights(model, state, str(checkpoint), str(model_cfg["name"]))
    poisoned = factory()
    poisoned.load_state_dict(model.state_dict())
    poisoned.to(device).eval()
    # the recipe the weights were trained with is unknown: potion_iterative's repair sees the images as they are
    task = make_task(model, view, discovery, device, seed, model_cfg, train_cfg=REPAIR_DATA, attack=d.get("attack"))

    key = heal_identity(d, checkpoint, entries)
    out_dir = Path(str(d["out_dir"])) if d.get("out_dir") else default_out_dir(checkpoint, key)
    method = str(d["method"]["name"])
    study = naming.heal_study(d)
    with claimed_out_dir(out_dir, key, bool(d.get("force", False))), \
            run_lifecycle(naming.logger_for(d.get("logger"), study), out_dir,
                       run_name=naming.heal_run_name(method, discovery.n_f, str(model_cfg["name"])),
                       tags={**naming.study_tags(naming.HEAL, study), naming.METHOD: method}, config=d) as outputs:
        args = list(command) if command is not None else config_args({**d, "checkpoint": str(checkpoint)})
        return _heal(d, task, bundle, known, poisoned, method_fn, checkpoint, prefix, state, outputs, args)


def _heal(d: dict[str, Any], task: UnlearnTask, bundle: DatasetBundle, trigger: Trigger | None, poisoned: nn.Module,
          method_fn: Any, checkpoint: Path, prefix: str, state: Mapping[str, torch.Tensor], outputs: RunOutputs,
          args: list[str]) -> dict[str, Any]:
    model, view, discovery, device = task.model, task.train, task.discovery, task.device
    out_dir, tracker = outputs.folder, outputs.tracker
    bs = int(d.get("eval_batch_size", 1024))
    method = str(d["method"]["name"])
    target = task.attack.target
    outputs.uses_data(bundle, d["dataset"], context="unlearning")
    known = trigger is not None
    forget_images = view.images[discovery.forget_idx]
    given = view.labels[discovery.forget_idx]
    # what a known trigger's attack wants: the target, or (all-to-all) the next class, as the benchmark maps it
    wanted = (bundle.test.labels + 1) % view.num_classes if target is None else target

    def test_metrics(m: nn.Module) -> dict[str, float]:
        if known:
            return evaluate_backdoor(m, bundle.test.images, bundle.test.labels, view.normalizer, trigger, wanted, bs)
        return {"clean_acc": metrics.accuracy(predict(m, bundle.test.images, view.normalizer, batch_size=bs),
                                              bundle.test.labels)}

    before = test_metrics(model)
    preds_before = predict(model, forget_images, view.normalizer, batch_size=bs)
    method_args = method_arguments(d["method"])
    tracker.log_params({**naming.heal_params({**d, "checkpoint": str(checkpoint)}, discovery.n_f,
                                             -1 if target is None else target), **task.attack.summary()})

    out, unlearn_seconds = run_timed(method_fn, task, method_args)
    healed = out.model.eval()

    after = test_metrics(healed)
    preds_after = predict(healed, forget_images, view.normalizer, batch_size=bs)
    result: dict[str, Any] = {
        "clean_acc_before": before["clean_acc"], "clean_acc_after": after["clean_acc"],
        "acc_drop": metrics.acc_drop(before["clean_acc"], after["clean_acc"]),
        "discovered_given_label_before": metrics.accuracy(preds_before, given),
        "discovered_given_label_after": metrics.accuracy(preds_after, given),
        "unlearn_seconds": unlearn_seconds, **{k: float(v) for k, v in out.timings.items()},
    }
    if known:
        result.update({"asr_before": before["asr"], "asr_after": after["asr"],
                       "poison_acc_before": before["poison_acc"], "poison_acc_after": after["poison_acc"],
                       "healed": metrics.healed(after["poison_acc"], before["poison_acc"], before["clean_acc"])})

    ranking = None
    if (d.get("suspects") or {}).get("enabled", True):
        sus = d.get("suspects") or {}
        ranking, _ = find_suspects(poisoned, healed, view, discovery.retain_idx, discovery.forget_idx,
                                   target=target, signature=bool(sus.get("signature", True)),
                                   target_only=bool(sus.get("target_only", True)), seed=int(d.get("seed", 0)),
                                   batch_size=bs)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = outputs.add_model(_save_healed(out_dir, checkpoint, healed, prefix, state), d["model"], view.num_classes,
                                view.channels, key_prefix=prefix)
    suspects = _suspect_rows(ranking, bundle, target) if ranking is not None else None
    if ranking is not None:
        outputs.add(write_suspects_csv(out_dir / "suspects.csv", ranking, bundle.train.paths))
    plot = outputs.trajectory(out.trajectory, float(out.diagnostics.get("ptn_threshold", 0.0)),
                              title=f"PTN: {method}, n_f={discovery.n_f}")
    numeric = {k: float(v) for k, v in out.diagnostics.items() if isinstance(v, (int, float, bool))}
    notes = {k: v for k, v in out.diagnostics.items() if not isinstance(v, (int, float, bool))}
    summary = {
        **{k: metrics.finite_or_none(v) for k, v in result.items()}, **numeric, **notes,
        "method": method, "n_f": discovery.n_f, "num_train": len(bundle.train), "num_test": len(bundle.test),
        **task.attack.summary(), "target": target,
        "target_class": ALL_TO_ALL if target is None else bundle.classes[target], "trigger_known": known,
        "discovered_predictions_before": _histogram(preds_before, bundle.classes),
        "discovered_predictions_after": _histogram(preds_after, bundle.classes),
        "checkpoint": str(checkpoint), "key_prefix": prefix, "dataset": str(d["dataset"].get("path")),
        "discovered_list": str(d.get("discovered")), "healed_weights": str(weights), "out_dir": str(out_dir),
        "device": device.type, "mlflow_run_id": tracker.run_id,
        **(suspects or {}), **_added(out.forget_idx, discovery, bundle, d["method"]),
    }
    summary.update(_next_steps(out_dir, summary, args, ranking, discovery, bundle, outputs))
    outputs.add(atomic_write_text(out_dir / "report.md", format_report(summary, plot is not None)))
    tracker.log_params(naming.resolved_settings({**numeric, **notes, **(suspects or {})}))
    return outputs.complete(summary, naming.heal_measurements({**result, **numeric}, d["method"]))


def _added(forget_idx: torch.Tensor | None, discovery: Discovery, bundle: DatasetBundle, method: Mapping[str, Any]
           ) -> dict[str, Any]:
    """What an iterative method added to the forget set: the files it treated as poison beyond the list."""
    if forget_idx is None:
        return {}
    paths = bundle.train.paths or ()
    added = [paths[int(i)] for i in forget_idx[discovery.n_f:].tolist()]
    return {"suspects_added": len(added), "added_files": added, "method_rounds": method.get("rounds")}


def _next_steps(out_dir: Path, s: Mapping[str, Any], args: list[str], ranking: SuspectRanking | None,
                discovery: Discovery, bundle: DatasetBundle, outputs: RunOutputs) -> dict[str, Any]:
    """next_discovered.txt (the list, then the suspects to confirm) and the commands that heal again with it."""
    paths = bundle.train.paths or ()
    listed = [paths[int(i)] for i in discovery.forget_idx.tolist()]
    flagged = [paths[int(i)] for i in ranking.flagged().tolist()] if ranking is not None else []
    suspects = list(dict.fromkeys([*s.get("added_files", []), *flagged]))
    next_list = outputs.add(write_next_list(out_dir / NEXT_LIST, listed, suspects, str(s["discovered_list"])))
    cmds = next_commands(args, next_list, str(s["method"]), int(s["n_f"]))
    return {"next_discovered": str(next_list), "next_suspects_listed": len(suspects),
            "next_command": cmds["heal_again"], "next_command_iterative": cmds.get("iterative")}


def _save_healed(out_dir: Path, checkpoint: Path, healed: nn.Module, prefix: str,
                 original: Mapping[str, torch.Tensor]) -> Path:
    """healed.safetensors or healed.pt, with the input's format, key names and dtypes: a drop-in replacement."""
    tensors = {}
    for k, v in healed.state_dict().items():
        name = prefix + k
        ref = original.get(name)
        tensors[name] = v.detach().cpu().to(ref.dtype) if ref is not None else v.detach().cpu()
    suffix = ".safetensors" if checkpoint.suffix == ".safetensors" else ".pt"
    return save_tensors(out_dir / f"healed{suffix}", tensors)


def _histogram(preds: torch.Tensor, classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(int(p) for p in preds.tolist())
    return {classes[c]: n for c, n in sorted(counts.items(), key=lambda cn: (-cn[1], cn[0]))}


def _suspect_rows(ranking: SuspectRanking, bundle: DatasetBundle, target: int | None) -> dict[str, Any]:
    """What the summary and report say about the ranking: count above the cut-off and the top files."""
    paths = bundle.train.paths or ()
    flagged = ranking.flagged()
    order = torch.argsort(ranking.scores, descending=True)[:TOP_SUSPECTS]
    top = [{"rank": r, "path": paths[int(ranking.idx[j])], "score": float(ranking.scores[j]),
            "folder_class": bundle.classes[int(bundle.train.labels[ranking.idx[j]])]}
           for r, j in enumerate(order.tolist(), start=1)]
    in_target = int((bundle.train.labels[flagged] == target).sum()) if flagged.numel() and target is not None else 0
    return {"suspect_cutoff": ranking.cutoff, "suspects_flagged": int(flagged.numel()),
            "suspects_flagged_in_target_folder": in_target, "top_suspects": top}
