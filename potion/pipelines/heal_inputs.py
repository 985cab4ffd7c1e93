"""potion.heal's inputs: the user's checkpoint, the discovered list, the known trigger, and the out folder's claim.

Each is checked as a practitioner gives it (a pickled checkpoint, a file outside the data root, an out folder that
holds another run: one error line); potion/pipelines/heal.py runs the healing on what these return.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn as nn

from potion.config.compose import identity_hash
from potion.core.errors import CheckpointError, ConfigError, DataError
from potion.core.io import load_tensors, sha256_file
from potion.data.discovery import Discovery
from potion.data.poison import Trigger, TriggerSpec
from potion.data.sources import DatasetBundle, folder_data_root
from potion.pipelines.next_steps import NEXT_LIST
from potion.pipelines.run_folders import check_out_dir, claim_run_dir, remove_stale_temp_files, run_lock

KEY_PREFIXES = ("model.", "module.", "_orig_mod.")  # Lightning attribute, DataParallel/DDP, torch.compile
HOW_TO_LIST = ("a text file with one training file per line, relative to the data root "
               "(e.g. train/airplane/0042.jpg), or a CSV with a 'path' column")


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


def default_out_dir(checkpoint: Path, key: str) -> Path:
    """runs/heal/<checkpoint name>-<:func:`heal_identity`>."""
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
