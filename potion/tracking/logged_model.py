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
from potion.tracking.extras import MODEL_FORMAT, MODEL_SPEC, MODEL_WEIGHTS
from potion.tracking.tracker import check_reachable, open_client, resolve_tracking_uri


def logged_model_id(tracking_uri: str, run_id: str) -> str:
    """The id of the logged model a run produced (its first model output); one TrackingError line when none."""
    client = _client(tracking_uri)
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

    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)  # a clear line for a dead server or a bad URI
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
    if spec.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{folder / MODEL_SPEC} has format {spec.get('format')!r}, not {MODEL_FORMAT!r}")
    state = load_tensors(folder / str(spec.get("weights") or MODEL_WEIGHTS))
    prefix = str(spec.get("key_prefix") or "")
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    model = build_model(str(spec["architecture"]), int(spec["num_classes"]), int(spec["channels"]),
                        **dict(spec.get("kwargs") or {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {folder} do not fit {spec['architecture']}: "
                              f"{str(exc).splitlines()[0]}") from exc
    return model.eval(), spec


def _client(tracking_uri: str) -> Any:
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return open_client(uri)[0]
