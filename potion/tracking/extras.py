"""What an MLflow user expects of a run beyond params and metrics: the data set as a dataset input, the weights as
a logged model of safetensors files (never a pickle), system metrics that a dead server cannot hold up, and the
run's UI addresses. Torch-free; ``mlflow`` is imported inside the functions (it is slow to import).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from potion.core.io import plain
from potion.tracking.uris import SQLITE, is_http

log = logging.getLogger(__name__)

DATA_CONTEXT_TAG = "mlflow.data.context"  # what the run used the data set for (MLflow's own input tag)
DIGEST_CHARS = 32  # MLflow stores a dataset digest of at most 36 characters: a 128-bit prefix of the fingerprint
MODEL_SPEC = "model.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.yaml"
MODEL_FORMAT = "potion-model/1"
MODEL_TYPE = "potion-image-classifier"
UI_PORT = 5000  # where `mlflow ui` listens by default
SYSTEM_METRICS_STOP_S = 10.0  # the most a finishing run waits for the system metrics thread
_BAD_MODEL_NAME = re.compile(r"[/:.%\"'\s]+")


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class DatasetRef:
    """A data set as an MLflow dataset input: plain strings and numbers, so a recorded run can carry it as JSON."""

    name: str
    digest: str  # the first DIGEST_CHARS characters of the content fingerprint
    source_type: str  # local (a file or folder) or code (built into a dependency)
    source: str  # MLflow's JSON text for that source type
    profile: dict[str, Any] = field(default_factory=dict)  # sizes, the whole fingerprint, the normalisation

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a recorded run)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DatasetRef:
        """Back from :meth:`to_dict`."""
        return cls(str(raw["name"]), str(raw["digest"]), str(raw["source_type"]), str(raw["source"]),
                   dict(raw.get("profile") or {}))


def dataset_ref(bundle: Any, dataset_cfg: Mapping[str, Any]) -> DatasetRef:
    """The input of a run that read ``bundle`` (a decoded :class:`~potion.data.sources.DatasetBundle`) as
    ``dataset_cfg`` says (its ``name``, ``source`` and ``path``)."""
    fingerprint = str(bundle.fingerprint)
    path = dataset_cfg.get("path")
    if path not in (None, "", "???"):
        source_type, source = "local", json.dumps({"uri": Path(str(path)).expanduser().absolute().as_posix()})
    else:
        source_type = "code"
        source = json.dumps({"tags": {"source": str(dataset_cfg.get("source") or bundle.name)}})
    images = bundle.train.images
    profile = {"fingerprint": fingerprint, "source": str(dataset_cfg.get("source") or bundle.name),
               "num_train": len(bundle.train), "num_test": len(bundle.test), "num_classes": len(bundle.classes),
               "image_shape": [int(s) for s in images.shape[1:]], "mean": [float(m) for m in bundle.mean],
               "std": [float(s) for s in bundle.std]}
    name = str(dataset_cfg.get("name") or bundle.name)
    return DatasetRef(name, fingerprint[:DIGEST_CHARS], source_type, source, profile)


def dataset_input(ref: DatasetRef, context: str | None) -> Any:
    """MLflow's DatasetInput entity for ``ref``, tagged with what the run used it for."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(ref.name, ref.digest, ref.source_type, ref.source,
                      profile=json.dumps(ref.profile, sort_keys=True) if ref.profile else None)
    return DatasetInput(dataset, [InputTag(DATA_CONTEXT_TAG, context)] if context else [])


def find_run(client: Any, run_id: Any) -> Any:
    """Run ``run_id`` of this store, or None: no id, or one logged elsewhere or deleted (a link tag may still name
    it, which is no error)."""
    if not run_id or run_id == "None":
        return None
    try:
        return client.get_run(str(run_id))
    except Exception as exc:  # noqa: BLE001 - unknown here: missing
        log.debug("run %s is not in this store (%s)", run_id, exc)
        return None


def model_inputs_of(client: Any, run_id: str | None) -> list[Any]:
    """The logged models a run produced, as inputs of another run (the training run's model of an unlearning run);
    none for a run unknown to this store."""
    from mlflow.entities import LoggedModelInput

    outputs = getattr(find_run(client, run_id), "outputs", None)
    return [LoggedModelInput(o.model_id) for o in (outputs.model_outputs if outputs else [])]


def inputs_of(client: Any, run_id: str | None) -> tuple[list[Any], list[Any]]:
    """The (dataset inputs, model inputs) of a run, to repeat them on a sweep's parent run; none for an unknown run."""
    inputs = getattr(find_run(client, run_id), "inputs", None)
    if inputs is None:
        return [], []
    return list(inputs.dataset_inputs), list(inputs.model_inputs)


# --------------------------------------------------------------------------- logged models


def model_spec(model_cfg: Mapping[str, Any], num_classes: int, channels: int, *, key_prefix: str = "",
               data: DatasetRef | None = None) -> dict[str, Any]:
    """``model.json``: what rebuilds the network for these weights (``potion.tracking.logged_model``).

    ``key_prefix`` is the prefix every weight name carries (a practitioner's checkpoint saved as ``model.*``);
    ``data`` adds the input normalisation and class count the model was trained for.
    """
    cfg = {str(k): plain(v) for k, v in dict(model_cfg).items()}
    spec: dict[str, Any] = {"format": MODEL_FORMAT, "architecture": str(cfg.pop("name")), "kwargs": cfg,
                            "num_classes": int(num_classes), "channels": int(channels), "key_prefix": key_prefix,
                            "weights": MODEL_WEIGHTS}
    if data is not None:
        spec["input"] = {k: data.profile[k] for k in ("image_shape", "mean", "std") if k in data.profile}
        spec["dataset"] = {"name": data.name, "digest": data.digest}
    return spec


def model_params(spec: Mapping[str, Any]) -> dict[str, str]:
    """The logged model's params (shown in the UI's model page): architecture, its arguments, classes, channels."""
    params = {"architecture": str(spec["architecture"]), "num_classes": str(spec["num_classes"]),
              "channels": str(spec["channels"]), "format": str(spec["format"])}
    params.update({f"model.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in spec["kwargs"].items()})
    return params


def model_name(run_name: str | None) -> str:
    """A logged-model name MLflow accepts (no ``/ : . % " '``)."""
    name = _BAD_MODEL_NAME.sub("_", str(run_name or "model")).strip("_")
    return name[:200] or "model"


def upload_logged_model(client: Any, experiment_id: str, run_id: str, name: str, files: Mapping[str, str],
                        spec: Mapping[str, Any]) -> str:
    """Register ``files`` (artifact name -> local path, safetensors and text only) plus ``model.json`` as an MLflow
    logged model of ``run_id`` (listed as the run's output); its model id.

    The model is created PENDING, its files uploaded, then finalised READY; a failure part-way marks it FAILED
    (best effort) and raises for the caller's guard.
    """
    from mlflow.entities import LoggedModelOutput

    if not str(files.get(MODEL_WEIGHTS, "")).endswith(".safetensors"):
        raise ValueError(f"a logged model's weights must be a .safetensors file, not {files.get(MODEL_WEIGHTS)!r}")
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=model_params(spec),
                                       tags={"potion.format": MODEL_FORMAT}, model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory(prefix="potion-model-") as tmp:
            stage_model_files(Path(tmp), files, spec)
            client.log_model_artifacts(model.model_id, tmp)
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - the first failure is the one reported
            log.debug("marking logged model %s FAILED failed: %s", model.model_id, exc)
        raise
    return str(model.model_id)


def stage_model_files(folder: Path, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
    """Lay the model's files into ``folder`` for upload: hard links where possible (weights can be large)."""
    for name, src in files.items():
        dst = folder / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    (folder / MODEL_SPEC).write_text(json.dumps(dict(spec), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- system metrics


def start_system_metrics(run_id: str, tracking_uri: str, interval_s: float) -> Any:
    """MLflow's system metrics monitor (CPU, memory, disk, network, GPU; ``system/*`` metrics) for ``run_id``,
    sampling every ``interval_s`` seconds; None (and one warning) when it cannot start (psutil missing)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - system metrics are optional
        log.warning("system metrics are off for run %s: %s (pip install psutil)", run_id, exc)
        return None
    return monitor


def stop_system_metrics(monitor: Any, run_id: str, limit_s: float = SYSTEM_METRICS_STOP_S) -> None:
    """Stop the monitor and log what it sampled since its last logging (a run shorter than one interval still gets
    a point); gives up after ``limit_s`` seconds, so a dead server never holds up the end of a run."""
    if monitor is None:
        return
    done = threading.Thread(target=_finish_monitor, args=(monitor,), daemon=True, name="potion-system-metrics-stop")
    done.start()
    done.join(limit_s)
    if done.is_alive():
        log.warning("system metrics of run %s were not all logged within %.0f s", run_id, limit_s)


def _finish_monitor(monitor: Any) -> None:
    try:
        monitor.finish()  # stops the sampling thread and flushes what it logged
        metrics = monitor.aggregate_metrics()  # samples taken since the last logging step
        if metrics:
            monitor.publish_metrics(metrics)
            monitor.mlflow_logger.flush()
    except Exception as exc:  # noqa: BLE001 - system metrics are optional
        log.debug("finishing system metrics failed: %s", exc)


# --------------------------------------------------------------------------- the UI


def ui_base(tracking_uri: str) -> str | None:
    """Where the MLflow UI of a store is: the server itself, ``mlflow ui``'s default address for a sqlite store,
    None for other stores."""
    if is_http(tracking_uri):
        return tracking_uri.rstrip("/")
    if tracking_uri.startswith(SQLITE):
        return f"http://127.0.0.1:{UI_PORT}"
    return None


ML_WORKFLOW = "workflowType=machine_learning"  # the UI's machine-learning pages, not MLflow 3's GenAI ones


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{ML_WORKFLOW}"


def runs_table_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table."""
    return f"{base}/#/experiments/{experiment_id}/runs?{ML_WORKFLOW}"


def ui_lines(tracking_uri: str, experiment_id: str | None, run_id: str | None, what: str = "run",
             table: bool = True) -> list[str]:
    """What a command prints so its user lands on the run in the UI (nothing when the store has no UI): the run's
    page and, with ``table``, the experiment's runs table and how to open the UI of a sqlite store."""
    base = ui_base(tracking_uri)
    if base is None or not experiment_id or not run_id:
        return []
    lines = [f"MLflow {what}: {run_url(base, experiment_id, run_id)}"]
    if table:
        lines.append(f"MLflow runs table: {runs_table_url(base, experiment_id)}")
        if tracking_uri.startswith(SQLITE):
            lines.append(f"  (open the UI first: mlflow ui --backend-store-uri {tracking_uri} --port {UI_PORT})")
    return lines
