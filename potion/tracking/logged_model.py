"""Load back the weights a run registered as an MLflow logged model (safetensors files, never a pickle).

A run's logged model holds ``model.safetensors`` (the weights), ``model.json`` (the architecture, its arguments,
the class and channel counts, the input normalisation) and the run's ``config.yaml``::

    from potion.tracking.logged_model import download_logged_model, load_logged_model, logged_model_id

    model_id = logged_model_id("sqlite:///mlflow.db", "<run id>")       # or the m-... id the UI shows
    folder = download_logged_model("sqlite:///mlflow.db", model_id, "healed")
    model, spec = load_logged_model(folder)                             # an nn.Module in eval mode

Without potion, ``safetensors.torch.load_file(folder / "model.safetensors")`` gives the state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from potion.core.errors import CheckpointError, TrackingError
from potion.core.io import load_tensors
from potion.models import build_model
from potion.tracking.client import connect
from potion.tracking.extras import MODEL_FORMAT, MODEL_SPEC, MODEL_WEIGHTS

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; more is no classifier this project trains
MAX_CHANNELS = 64


def logged_model_id(tracking_uri: str, run_id: str) -> str:
    """The id of the logged model a run produced (its first model output); one TrackingError line when none."""
    client, _ = connect(tracking_uri)
    try:
        outputs = client.get_run(run_id).outputs
    except Exception as exc:  # unknown or malformed id: the same to the user
        raise TrackingError(f"unknown MLflow run id {run_id!r} in {tracking_uri} ({exc})") from exc
    models = outputs.model_outputs if outputs else []
    if not models:
        raise TrackingError(f"MLflow run {run_id} has no logged model (a run made before potion logged models, or "
                            "one whose weights were not saved: save_weights=false)")
    return str(models[0].model_id)


def download_logged_model(tracking_uri: str, model_id: str, dst: str | Path) -> Path:
    """Fetch a logged model's files into ``dst``; the folder holding ``model.safetensors``."""
    from mlflow.artifacts import download_artifacts

    client, uri = connect(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:  # through the model's artifact location: ``models:/<id>`` reads the process-wide tracking URI
        location = client.get_logged_model(model_id).artifact_location
        return Path(download_artifacts(artifact_uri=location, dst_path=str(dst), tracking_uri=uri))
    except Exception as exc:
        raise TrackingError(f"cannot download logged model {model_id} from {uri} ({exc})") from exc


def load_logged_model(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a downloaded logged model with its weights loaded (eval mode), and its ``model.json``."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / MODEL_SPEC).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} holds no readable {MODEL_SPEC}: not a potion logged model ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != MODEL_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise CheckpointError(f"{folder / MODEL_SPEC} has format {found!r}, not {MODEL_FORMAT!r}")
    num_classes = _count(spec, "num_classes", MAX_CLASSES, folder)
    channels = _count(spec, "channels", MAX_CHANNELS, folder)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not isinstance(spec.get("architecture"), str):
        raise CheckpointError(f"{folder / MODEL_SPEC}: architecture must be a name and kwargs a mapping")
    state = load_tensors(_weights_file(folder, spec.get("weights") or MODEL_WEIGHTS))
    prefix = str(spec.get("key_prefix") or "")
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    model = build_model(spec["architecture"], num_classes, channels, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {folder} do not fit {spec['architecture']}: "
                              f"{str(exc).splitlines()[0]}") from exc
    return model.eval(), spec


def _count(spec: dict[str, Any], key: str, most: int, folder: Path) -> int:
    """A positive integer of ``model.json`` up to ``most``: a hostile file must not ask for a 128 TB output layer."""
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise CheckpointError(f"{folder / MODEL_SPEC}: {key}={value!r} must be an integer from 1 to {most}")
    return value


def _weights_file(folder: Path, name: Any) -> Path:
    """The weights file ``model.json`` names, which must lie in the model's folder (no absolute or ``..`` path):
    a downloaded model never opens a file elsewhere on the machine."""
    path = folder / str(name)
    inside = not Path(str(name)).is_absolute() and ".." not in Path(str(name)).parts
    try:
        inside = inside and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        inside = False
    if not inside:
        raise CheckpointError(f"{folder / MODEL_SPEC}: weights={name!r} is not a file of the model folder {folder}; "
                              f"a logged model's weights are its own {MODEL_WEIGHTS}")
    return path
