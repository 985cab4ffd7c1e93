"""Heal your own model: weights this project did not train, poisoned files already in the data, a discovered list.

``python -m potion.heal checkpoint=<weights> dataset.path=<image folder> discovered=<list> model=<arch>``

The inputs are what a practitioner has: a plain state dict (``.pt`` / ``.pth`` read with
``weights_only=True``, or ``.safetensors``), an image folder whose poisoned training files carry the
trigger in their pixels and sit in the class folder of the label the attacker gave them, and the list of
poisoned files found so far. What is known of the attack can be declared (``attack.target``, ``attack.mapping``,
``attack.clean_label``); the rest is inferred from the discovered files' folders, as in unlearn.py. No trigger
is pasted anywhere: the data set is taken exactly as it is on disk. The discovered files become the forget set
and every other training file the retain set; then the same
registered method as ``unlearn.py`` (potion, assd, lfssd or ssd) heals the model, and the remaining
training files are ranked by how likely they are to be undiscovered poison (:mod:`potion.unlearning.suspects`).

Outputs (in ``out_dir``): ``healed.pt`` or ``healed.safetensors`` (the input's format and key names),
``report.md``, ``suspects.csv``, ``ptn_trajectory.png``/``.csv`` (PTN methods) and, written last,
``summary.json``. A known trigger (``trigger={kind: patch, size: 3, color: [1, 1, 1]}``) adds the attack
success rate and poison accuracy on the test split; without it they are omitted.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn as nn

from potion.config.compose import identity_hash, method_arguments, model_kwargs, to_dict, validate_heal_config
from potion.core.errors import CheckpointError, ConfigError, DataError
from potion.core.io import atomic_write_text, load_tensors, save_tensors, sha256_file
from potion.core.schedule import cpu_threads
from potion.data.defender import view_of_bundle
from potion.data.discovery import Discovery
from potion.data.poison import Trigger, TriggerSpec
from potion.data.poisoned import load_data
from potion.data.sources import DatasetBundle, folder_data_root
from potion.evaluation import metrics
from potion.evaluation.backdoor import evaluate_backdoor, predict
from potion.models import build_model
from potion.pipelines.lifecycle import RunOutputs, run_lifecycle
from potion.pipelines.next_steps import NEXT_LIST, config_args, format_next_steps, next_commands, write_next_list
from potion.pipelines.run_folders import check_out_dir, claim_run_dir, remove_stale_temp_files, run_lock
from potion.pipelines.unlearn import make_task, resolve_device
from potion.tracking import naming
from potion.unlearning.methods import get_method
from potion.unlearning.registry import run_timed
from potion.unlearning.suspects import SuspectRanking, find_suspects, write_suspects_csv
from potion.unlearning.task import UnlearnTask

log = logging.getLogger("potion.heal")

KEY_PREFIXES = ("model.", "module.", "_orig_mod.")  # Lightning attribute, DataParallel/DDP, torch.compile
TOP_SUSPECTS = 10
REPAIR_DATA = {"crop_padding": 0, "flip": False}  # no augmentation in potion_iterative's repair (recipe unknown)
ALL_TO_ALL = "several (all-to-all)"  # what the report names as the target class when the discovered files have many
HOW_TO_LIST = ("a text file with one training file per line, relative to the data root "
               "(e.g. train/airplane/0042.jpg), or a CSV with a 'path' column")


# ----------------------------------------------------------------------------------------------- inputs


def _required(d: Mapping[str, Any], key: str, what: str) -> str:
    value = d.get(key)
    if value in (None, "", "???"):
        raise ConfigError(f"{key}: required; give {what}")
    return str(value)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (never unpickling objects); a missing, pickled or corrupt file is a CheckpointError."""
    state = load_tensors(path)
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return state


def fit_keys(state: Mapping[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Strip a ``model.`` / ``module.`` / ``_orig_mod.`` prefix (repeatedly) while no key fits the model as is."""
    prefix = ""
    keys = list(state)
    while not any(k[len(prefix):] in expected for k in keys):
        nxt = next((p for p in KEY_PREFIXES if all(k[len(prefix):].startswith(p) for k in keys)), None)
        if nxt is None:
            break
        prefix += nxt
    return {k[len(prefix):]: v for k, v in state.items()}, prefix


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, model_name: str) -> str:
    """Load ``state`` into ``model`` strictly (after prefix stripping); returns the stripped prefix.

    A mismatch is one CheckpointError naming missing / unexpected keys and shape differences.
    """
    expected = model.state_dict()
    fitted, prefix = fit_keys(state, set(expected))
    try:
        model.load_state_dict(fitted, strict=True)
    except RuntimeError as exc:
        missing = [k for k in expected if k not in fitted and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in fitted if k not in expected]
        shapes = [f"{k} {list(fitted[k].shape)} (model: {list(v.shape)})" for k, v in expected.items()
                  if k in fitted and fitted[k].shape != v.shape]
        parts = [f"{len(x)} {label} (e.g. {', '.join(x[:3])})"
                 for label, x in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes))
                 if x]
        detail = "; ".join(parts) or str(exc).strip().splitlines()[-1][:200]
        raise CheckpointError(
            f"weights in {where} do not fit model {model_name}: {detail}; choose the architecture the weights were "
            "trained with (model=..., model.width=..., model.name=torchvision:<name>) and the same classes"
        ) from None
    return prefix


def read_discovered(path: str | Path) -> list[str]:
    """The listed training files, in order, duplicates dropped; an empty or unreadable list is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"discovered={path}: file not found; give {HOW_TO_LIST}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"discovered={path}: cannot read it as UTF-8 text ({type(exc).__name__}); "
                          f"give {HOW_TO_LIST}") from exc
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"discovered={path}: the list is empty; give {HOW_TO_LIST}")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    if "path" in header:
        col = header.index("path")
        entries = [row[col].strip() for row in csv.reader(lines[1:]) if len(row) > col and row[col].strip()]
    elif p.suffix.lower() == ".csv" and len(header) > 1:
        raise ConfigError(f"discovered={path}: the CSV has no 'path' column (columns: {', '.join(header)})")
    else:
        entries = lines
    entries = list(dict.fromkeys(e.replace("\\", "/").removeprefix("./") for e in entries))
    if not entries:
        raise ConfigError(f"discovered={path}: the list is empty; give {HOW_TO_LIST}")
    return entries


def _root_relative(entry: str, data_path: str) -> str | None:
    """``entry`` relative to the data root when it names a file inside it, else None.

    A folder data set: an absolute path, or one relative to the working folder or to ``dataset.path``,
    that resolves inside the data root. An archive: ``<top folder>/train/...`` (its single wrapper folder).
    """
    root = Path(data_path).expanduser()
    if not root.is_dir():
        parts = PurePosixPath(entry).parts
        ok = len(parts) > 2 and parts[1] == "train" and not PurePosixPath(entry).is_absolute() and ".." not in parts
        return "/".join(parts[1:]) if ok else None
    data_root = folder_data_root(root).resolve()
    for candidate in (Path(entry).expanduser(), root / entry):
        try:
            return candidate.resolve().relative_to(data_root).as_posix()
        except (ValueError, OSError):
            continue
    return None


def resolve_discovered(entries: Sequence[str], bundle: DatasetBundle, list_path: str, data_path: str
                       ) -> torch.Tensor:
    """Training indices of the listed files (in list order); what their folders say of the attack is for
    :func:`potion.unlearning.attack.infer_attack` to decide."""
    paths = bundle.train.paths
    if paths is None:
        raise ConfigError(f"dataset={bundle.name}: healing your own model needs an image-folder data set "
                          "(dataset=imagefolder dataset.path=<folder or .tar.gz>) so that discovered files have names")
    index = {p: i for i, p in enumerate(paths)}
    found: list[int] = []
    unknown: list[str] = []
    for entry in entries:
        i = index.get(entry)
        if i is None:  # a path into the data root (absolute, or naming its folder), never one merely ending alike
            i = index.get(_root_relative(entry, data_path) or "")
        if i is None:
            unknown.append(entry)
        else:
            found.append(i)
    if unknown:
        hint = " (only training files can be discovered)" if any(u.startswith("test/") for u in unknown) else ""
        raise DataError(
            f"discovered={list_path}: {len(unknown)} of {len(entries)} listed files are not training images of "
            f"{data_path}: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}{hint}; list paths "
            f"relative to the data root, like {paths[0]}")
    idx = torch.tensor(list(dict.fromkeys(found)), dtype=torch.long)
    if idx.numel() >= len(bundle.train):
        raise ConfigError(f"discovered={list_path}: lists every training file; nothing would be left to retain")
    return idx


def trigger_spec(cfg: Any) -> TriggerSpec | None:
    """The optional known trigger (TriggerSpec keys), or None."""
    if cfg in (None, "", "???", {}):
        return None
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"trigger={cfg!r}: give a mapping such as '{{kind: patch, size: 3, color: [1, 1, 1]}}' "
                          "or leave it null")
    try:
        return TriggerSpec.from_config(cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"trigger={dict(cfg)}: {exc}") from exc


def evaluation_trigger(bundle: DatasetBundle, trigger: TriggerSpec | None) -> Trigger | None:
    """The known trigger built for this data set's images (for the test metrics only), or None."""
    if trigger is None:
        return None
    _, c, h, w = bundle.train.images.shape
    try:
        return Trigger(trigger, c, h, w, bundle.mean, bundle.std)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("poison.trigger.", "trigger.")) from None


def complement_discovery(forget_idx: torch.Tensor, num_train: int, seed: int) -> Discovery:
    """Forget = the discovered files (list order), retain = every other training file."""
    keep = torch.ones(num_train, dtype=torch.bool)
    keep[forget_idx] = False
    return Discovery(forget_idx=forget_idx, retain_idx=torch.nonzero(keep).view(-1), seed=seed)


def heal_identity(d: Mapping[str, Any], checkpoint: Path, entries: Sequence[str]) -> str:
    """The hash of what decides a heal's result: the config, the weights' bytes and the discovered list."""
    return identity_hash({**d, "checkpoint": sha256_file(checkpoint), "discovered": list(entries)})


def default_out_dir(d: Mapping[str, Any], checkpoint: Path, entries: Sequence[str], key: str | None = None) -> Path:
    """runs/heal/<checkpoint name>-<hash of the config, the weights' bytes and the discovered list>."""
    key = key or heal_identity(d, checkpoint, entries)
    return Path("runs") / "heal" / f"{checkpoint.stem}-{key}"


# A heal's outputs that the run-folder claim does not delete itself: removed when a heal starts over in a folder.
HEAL_ONLY_FILES = ("ptn_trajectory.png", NEXT_LIST, "run.log")


def refuse_out_dir_in_data(d: Mapping[str, Any]) -> None:
    """An out_dir inside the image folder is refused: its PNG plot and files would be read back as training images."""
    out, data = d.get("out_dir"), (d.get("dataset") or {}).get("path")
    if out in (None, "", "???") or data in (None, "", "???"):
        return
    root = Path(str(data)).expanduser()
    if not root.is_dir():
        return  # an archive: nothing is written into it
    root, where = root.resolve(), Path(str(out)).expanduser().resolve()
    if where == root or root in where.parents:
        raise ConfigError(f"out_dir={out} lies inside the data folder dataset.path={data}: the healed weights, plot "
                          "and report would become files of the data set (read as images by the next run); choose "
                          "an out_dir outside it")


@contextmanager
def claimed_out_dir(out_dir: Path, key: str, force: bool) -> Iterator[None]:
    """The out folder locked and marked as this heal's (run.json), as unlearn.py claims its folder.

    A training or unlearning run's folder is refused; another heal's (other inputs) too unless ``force``, which
    deletes its outputs first, so two heals' files never lie side by side. A second heal of the same inputs
    waits for the first, then writes the same files again.
    """
    with run_lock(out_dir):
        fresh = check_out_dir(out_dir, "heal", key, force)
        claim_run_dir(out_dir, "heal", key, fresh)
        if fresh:
            for name in HEAL_ONLY_FILES:
                (out_dir / name).unlink(missing_ok=True)
        remove_stale_temp_files(out_dir)  # what a killed heal left (we hold the lock)
        yield


# ----------------------------------------------------------------------------------------------- healing


def heal(cfg: Any, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Heal the checkpoint with the discovered list; write the out folder and return the summary.

    ``command``: the overrides of the ``python -m potion.heal`` command line (the report's next-steps commands
    are built from them); None (a call from Python) rebuilds the inputs from the config.
    """
    d = to_dict(cfg)
    validate_heal_config(d)
    refuse_out_dir_in_data(d)
    method_fn = get_method(str(d["method"]["name"]))
    checkpoint = Path(_required(d, "checkpoint", "your model's weights: a state dict saved with torch.save "
                                                 "(.pt/.pth) or a .safetensors file"))
    list_path = _required(d, "discovered", HOW_TO_LIST)
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
    out_dir = Path(str(d["out_dir"])) if d.get("out_dir") else default_out_dir(d, checkpoint, entries, key)
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
    """healed.safetensors for a .safetensors input, else healed.pt (torch.save of a plain tensor dict).

    Key names (including a stripped ``model.``/``module.`` prefix) and dtypes are those of the input, so the
    file is a drop-in replacement for it.
    """
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


# ----------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _counts(hist: Mapping[str, int]) -> str:
    return ", ".join(f"`{c}` {n}" for c, n in hist.items()) or "none"


def format_report(s: Mapping[str, Any], with_plot: bool) -> str:
    """report.md: before/after on the test split, the discovered samples, the suspects, the PTN plot."""
    n_f, tgt = s["n_f"], s["target_class"]
    weights = Path(str(s["healed_weights"])).name
    lines = [
        f"# Healing report: `{Path(str(s['checkpoint'])).name}`", "",
        f"Healed with `{s['method']}` from {n_f} discovered poisoned training files in class folder `{tgt}` "
        f"(of {s['num_train']} training images). Healed weights: [{weights}]({weights}).", "",
        "| | before | after |", "|---|---|---|",
        f"| clean accuracy (test split, {s['num_test']} images) | {_pct(s['clean_acc_before'])} | "
        f"{_pct(s['clean_acc_after'])} |",
        f"| discovered samples predicted as their given label `{tgt}` | {_pct(s['discovered_given_label_before'])} | "
        f"{_pct(s['discovered_given_label_after'])} |",
    ]
    if s.get("trigger_known"):
        lines += [f"| attack success rate (known trigger on non-`{tgt}` test images) | {_pct(s['asr_before'])} | "
                  f"{_pct(s['asr_after'])} |",
                  f"| poison accuracy (known trigger on all test images) | {_pct(s['poison_acc_before'])} | "
                  f"{_pct(s['poison_acc_after'])} |"]
    drop = s.get("acc_drop")
    change = "n/a" if drop is None else f"{0.0 - drop:+.2f} percentage points"
    lines += ["", f"Clean accuracy change: {change}."
              + ("" if s.get("trigger_known") else " No trigger was given (`trigger=...`), so the attack success "
                 "rate is not measured."), ""]
    lines += ["## The discovered samples", "",
              f"Predicted classes of the {n_f} discovered samples before healing: "
              f"{_counts(s['discovered_predictions_before'])}.",
              f"After healing: {_counts(s['discovered_predictions_after'])}.", ""]
    if "top_suspects" in s:
        lines += ["## Suspects: likely undiscovered poison", "",
                  f"{s['suspects_flagged']} other training files score above the cut-off "
                  f"({s['suspect_cutoff']:.4g}; {s['suspects_flagged_in_target_folder']} of them in the `{tgt}` "
                  "folder, where poison sits). Score = how much healing lowered the model's belief in the file's "
                  "folder label. Full ranking: [suspects.csv](suspects.csv).", "",
                  "| rank | file | score |", "|---|---|---|"]
        lines += [f"| {t['rank']} | `{t['path']}` | {t['score']:.4g} |" for t in s["top_suspects"]]
        lines.append("")
    lines += _rounds_section(s)
    if with_plot:
        lines += ["## PTN search", "", "![PTN trajectory](ptn_trajectory.png)", ""]
        if s.get("ptn_steps") is not None:
            lines.append(f"Stopped after {int(s['ptn_steps'])} steps at forget accuracy "
                         f"{_pct(s.get('ptn_forget_acc'))} (threshold {_pct(s.get('ptn_threshold'))}), "
                         f"{_pct(s.get('ptn_dampened_share'))} of the parameters dampened.")
        if s.get("ptn_note"):
            lines.append(f"Note: {s['ptn_note']}.")
        lines.append("")
    lines += [f"Unlearning took {s['unlearn_seconds']:.1f} s on {s['device']}.", ""]
    lines += format_next_steps(s)
    return "\n".join(lines)


def _rounds_section(s: Mapping[str, Any]) -> list[str]:
    """An iterative method's rounds: forget set, PTN steps and suspects flagged per round; the repair."""
    n = int(s.get("rounds_run") or 0)
    if not n:
        return []
    limit = s.get("method_rounds")
    why = (f"the round limit (`method.rounds={int(limit)}`)" if limit is not None and n >= int(limit)
           else "no new suspect appeared")
    added = int(s.get("suspects_added", 0))
    steps = [s.get(f"round{r}_ptn_steps") for r in range(1, n + 1)]
    lines = ["## Suspect rounds", "",
             f"`{s['method']}` healed from your original weights in {n} round{'s' if n != 1 else ''}, each with the "
             f"forget set of the round before plus the suspects that round flagged, and stopped after round {n}: "
             f"{why}. It added {added} file{'s' if added != 1 else ''} to your {s['n_f']} discovered ones (treated "
             f"as poison; they head the suspects in [{NEXT_LIST}]({NEXT_LIST})).", "",
             "| round | forget set | PTN steps | suspects flagged |", "|---|---|---|---|"]
    lines += [f"| {r} | {int(s[f'round{r}_forget_size'])} | {'n/a' if k is None else int(k)} | "
              f"{int(s[f'round{r}_flagged'])} |" for r, k in enumerate(steps, start=1)]
    lines.append("")
    if s.get("repair_iterations"):
        lines += [f"Repair: {int(s['repair_iterations'])} fine-tuning steps at learning rate {s['repair_lr']:g} on the "
                  f"{int(s['repair_retain_samples'])} training files outside the final forget set "
                  f"({s['repair_seconds']:.1f} s); dampened weights stay as they are.", ""]
    return lines


def format_result(s: Mapping[str, Any]) -> str:
    """The console lines of ``python -m potion.heal``."""
    lines = [f"out folder: {s['out_dir']}",
             # fractions and percentage points, as unlearn.py prints them and MLflow stores them (README, Metrics)
             f"{s['method']}: n_f={s['n_f']}  clean_acc {s['clean_acc_before']:.4f} -> {s['clean_acc_after']:.4f}  "
             f"forget_acc {_frac(s['discovered_given_label_before'])} -> {_frac(s['discovered_given_label_after'])}"
             + (f"  asr {_frac(s['asr_before'])} -> {_frac(s['asr_after'])}" if s.get("trigger_known") else "")
             + f"  acc_drop={'n/a' if s.get('acc_drop') is None else format(s['acc_drop'], '.2f')}"]
    if "suspects_flagged" in s:
        lines.append(f"suspects above the cut-off: {s['suspects_flagged']} (ranking in suspects.csv)")
    if s.get("rounds_run"):
        lines.append(f"{s['method']}: {int(s['rounds_run'])} rounds, {s.get('suspects_added', 0)} suspects added to "
                     "the forget set")
    if s.get("ptn_note"):
        lines.append(f"note: {s['ptn_note']}")
    lines.append(f"next: confirm the suspects in {s['next_discovered']} (see report.md), then heal again:\n  "
                 f"{s['next_command']}")
    return "\n".join(lines)
