"""Reliability and security: nothing lost, nothing executed, every failure explained.

One test per property, each written so that it fails when the property is taken away:

1. untrusted files are refused, never executed; corrupt ones are one clear error (or rebuilt, for caches);
2. outputs are atomic: a process killed mid-write leaves the old complete file or none;
3. a killed training run resumes from its last checkpoint and ends where an uninterrupted one does;
4. a restarted multirun skips its finished jobs;
5. caches are content-addressed and safe to fill from parallel processes;
6. tracking failures end in one line before any work, or never lose a finished run;
7. every bad config value is a ConfigError/DataError naming the key, raised before work starts;
8. the same config and seed give the same plan, discovered set and unlearning metrics.

The trained run the tests read or copy is the session's tiny model (tests/conftest.py); the resume test trains its own
(an uninterrupted and a killed run of one recipe that checkpoints every 5 steps). Subprocesses get a private
``POTION_CACHE_DIR``, one torch thread and ``logger=none`` (except tracking tests).
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TinyRun
from PIL import Image
from tiny_world import defender_task, train_overrides

from potion.config.compose import compose_config
from potion.core.errors import CheckpointError, ConfigError, DataError
from potion.core.io import atomic_write_json, load_tensors, read_json, save_tensors
from potion.data import sources
from potion.data.discovery import discover
from potion.data.poison import TriggerSpec
from potion.data.poisoned import load_data, plan_from_config, poison
from potion.pipelines.run_folders import load_trained_run, read_summary, write_plan
from potion.unlearning import cache as importance_cache
from potion.unlearning import ssd_family
from potion.unlearning.task import UnlearnTask

SMALL_CNN = ["model=small_cnn", "model.width=32"]  # what the tracking tests were tuned on (quickstart: ResNet-9)
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
UNLEARN_ARGS = ["method=potion", "discovery.share=0.5", "logger=none", "method.importance.retain_samples=256"]
TEMP_NAME = r"\.{name}\..+\.tmp"  # what potion.core.io._atomic names its temporary files


# ------------------------------------------------------------------------------------------------ helpers


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "POTION_CACHE_DIR": str(cache), "POTION_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _run(args: list[str], cwd: Path, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, *args], cwd=cwd, env=_env(cache), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def _spawn_until_signal(args: list[str], cwd: Path, cache: Path, sig: Path, timeout: float = 120) -> None:
    """Start ``python args`` (a child that writes ``sig`` and then sleeps), wait for ``sig``, SIGKILL it."""
    proc = subprocess.Popen([PY, *args], cwd=cwd, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + timeout
    try:
        while not sig.exists():
            if proc.poll() is not None:
                pytest.fail(f"child ended (rc {proc.returncode}) before the kill point:\n{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("child never reached the kill point")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without wall-clock times and paths: what must be identical between equal runs."""
    skip = ("run_dir", "reused", "importance_cache_hit")
    return {k: v for k, v in summary.items() if not k.endswith("seconds") and k not in skip}


def _unlearn_in_process(train_run: Path, out_dir: Path, *extra: str) -> dict[str, Any]:
    from potion.pipelines.unlearn import run_unlearning

    return run_unlearning(compose_config("unlearn", [f"train_run={train_run}", *UNLEARN_ARGS, f"out_dir={out_dir}",
                                                     *extra]))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def trained(tiny: TinyRun) -> Path:
    """The session's tiny poisoned model's run folder (read or copy it, never write into it)."""
    return tiny.run


def _train_args(tiny: TinyRun, out: Path, *extra: str) -> list[str]:
    """The session's tiny model's training overrides (its run folder's config), into ``out``."""
    return train_overrides(tiny.data, out, "logger=none", *extra)


@pytest.fixture(scope="module")
def tracking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the tracking tests' local sqlite store (created once: its schema set-up is slow)."""
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture(autouse=True)
def _in_process_env(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("POTION_THREADS", "1")


# ------------------------------------------------------------------------------------------------ 1. untrusted files


class _Payload:
    """Pickles to ``open(marker, "w")``: loading it with a plain unpickler creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(4), "payload": _Payload(marker)}, path)
    return path


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "model.pt", marker)
    with pytest.raises(CheckpointError) as info:
        load_tensors(evil)
    message = str(info.value)
    assert "refused to load" in message and "pickled objects" in message and str(evil) in message
    assert "\n" not in message
    assert not marker.exists()
    # control: the payload is live, an unrestricted load would have run it
    control = tmp_path / "control-ran"
    loaded = torch.load(_malicious_checkpoint(tmp_path / "control.pt", control), weights_only=False)
    loaded["payload"].close()
    assert control.exists()


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_malicious_weights_in_a_run_folder_end_unlearn_in_one_line(trained: Path, tmp_path: Path,
                                                                    shared_cache: Path) -> None:
    marker = tmp_path / "pwned"
    run = _copy_run(trained, tmp_path / "run")
    _malicious_checkpoint(run / "model.safetensors", marker)
    proc = _run([str(ROOT / "unlearn.py"), f"train_run={run}", *UNLEARN_ARGS, f"out_dir={tmp_path / 'out'}"],
                tmp_path, shared_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _one_error_line(proc)
    assert "model.safetensors" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_truncated_checkpoint_is_one_line_error(tmp_path: Path, name: str) -> None:
    path = save_tensors(tmp_path / name, {"w": torch.randn(64, 64), "b": torch.zeros(3)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_tensors(path)
    assert name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_corrupt_importance_cache_entry_is_rebuilt(trained: Path, tmp_path: Path, cache: Path) -> None:
    first = _unlearn_in_process(trained, tmp_path / "u1")
    entries = sorted((cache / "importance").glob("*.safetensors"))
    assert len(entries) == 2 and first["importance_cache_hit"] == 0.0
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])
    second = _unlearn_in_process(trained, tmp_path / "u2")
    assert second["importance_cache_hit"] == 0.0  # recomputed, not trusted
    assert _metrics(second) == _metrics(first)
    for entry in entries:  # rewritten whole
        assert load_tensors(entry)


@pytest.mark.slow  # pipeline runs on the session's tiny model
@pytest.mark.parametrize("content", ['{"indices": [1, 2', "{}", "\udcff"])
def test_corrupt_poison_plan_is_a_clear_error(trained: Path, tmp_path: Path, content: str) -> None:
    run = _copy_run(trained, tmp_path / "run")
    (run / "poison_plan.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=r"poison_plan\.json") as info:
        load_trained_run(run)
    assert "\n" not in str(info.value)


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_corrupt_summary_means_unfinished(trained: Path, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path / "run")
    (run / "summary.json").write_text('{"clean_acc": 0.')
    assert read_summary(run) is None
    with pytest.raises(CheckpointError, match="unfinished"):
        load_trained_run(run)
    (run / "summary.json").unlink()
    (run / ".summary.json.x1y2.tmp").write_text((trained / "summary.json").read_text())  # a killed writer's temp
    assert read_summary(run) is None


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_corrupt_plan_of_a_resumable_training_run_is_a_clear_error(tiny: TinyRun, trained: Path,
                                                                    tmp_path: Path) -> None:
    from potion.pipelines.train import run_training

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()  # unfinished: the next call would resume it
    (run / "poison_plan.json").write_text('{"indices": [')
    with pytest.raises(CheckpointError, match=r"poison_plan\.json"):
        run_training(compose_config("train", _train_args(tiny, run)))
    assert not (run / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ 2. atomic outputs

_ATOMIC_CHILD = """
import os, sys, time, pathlib
import potion.core.io as pio
point, sig, dest = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]

def stop(*args, **kwargs):
    sig.write_text(point)
    time.sleep(600)

if point == "write":  # die with half of the payload on disk
    def half(self, data):
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
        stop()
    pathlib.Path.write_bytes = half
else:  # die just before the fsync or the rename
    setattr(os, point, stop)
pio.atomic_write_bytes(dest, b"N" * (50 << 20))
"""


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(("point", "old"), [("write", False), ("fsync", True), ("replace", True)])
def test_killed_writer_leaves_old_file_or_none(tmp_path: Path, shared_cache: Path, point: str, old: bool) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dest = run / "summary.json"
    previous = {"clean_acc": 0.5, "note": "the previous complete summary"}
    if old:
        atomic_write_json(dest, previous)
    before = dest.read_bytes() if old else None
    sig = tmp_path / "at-kill-point"
    _spawn_until_signal(["-c", _ATOMIC_CHILD, point, str(sig), str(dest)], tmp_path, shared_cache, sig)

    if old:
        assert dest.read_bytes() == before
        assert read_summary(run) == previous
    else:
        assert not dest.exists()
        assert read_summary(run) is None  # the temp file is not mistaken for a finished run
    strays = [p.name for p in run.iterdir() if p.name != dest.name]
    assert strays and all(re.fullmatch(TEMP_NAME.format(name=re.escape(dest.name)), s) for s in strays), strays
    assert sum((run / s).stat().st_size for s in strays) > 0  # the kill really hit a large write in progress

    atomic_write_json(dest, {"clean_acc": 0.9})  # a later run writes over it normally, temps or not
    assert read_json(dest) == {"clean_acc": 0.9}


# ------------------------------------------------------------------------------------------------ 3. resume

_RESUME_CHILD = """
import os, pathlib, runpy, sys, time
import potion.pipelines.lightning_module as training
sig = pathlib.Path(os.environ["POTION_TEST_SIGNAL"])
save = training.AtomicCheckpointIO.save_checkpoint

def save_then_hang(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    sig.write_text(str(path))
    time.sleep(600)

training.AtomicCheckpointIO.save_checkpoint = save_then_hang
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow  # trains the tiny model twice, once killed and resumed
def test_killed_training_resumes_to_the_same_result(tiny_data: Path, tmp_path: Path, shared_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines.train import run_training

    # its own recipe: the session's tiny model does not checkpoint every 5 steps (the step is part of its identity)
    trained = tmp_path / "uninterrupted"
    run_training(compose_config("train", train_overrides(tiny_data, trained, "logger=none",
                                                         "train.checkpoint_every_n_steps=5")))
    out = tmp_path / "run"
    args = train_overrides(tiny_data, out, "logger=none", "train.checkpoint_every_n_steps=5")
    sig = tmp_path / "checkpointed"
    monkeypatch.setenv("POTION_TEST_SIGNAL", str(sig))  # _env copies os.environ
    # the same train.py command, SIGKILLed right after its first checkpoint (step 5 of 80) is on disk
    _spawn_until_signal(["-c", _RESUME_CHILD, str(ROOT / "train.py"), *args], tmp_path, shared_cache, sig)
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "summary.json").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5

    text = _ok(_run([str(ROOT / "train.py"), *args], tmp_path, shared_cache))
    assert "resuming from" in text
    assert "Epoch 0" not in text  # trainer.progress_bar=auto: no Lightning bar where the console is a pipe
    resumed, reference = read_json(out / "summary.json"), read_json(trained / "summary.json")
    assert resumed["resumed"] is True and reference["resumed"] is False
    assert resumed["config_hash"] == reference["config_hash"]
    assert (out / "poison_plan.json").read_bytes() == (trained / "poison_plan.json").read_bytes()
    for key in ("clean_acc", "asr", "poison_acc"):  # bit for bit on CPU: batch order and augmentation are seeded
        assert resumed[key] == reference[key], (key, resumed[key], reference[key])  # by epoch / step, not by the past


# ------------------------------------------------------------------------------------------------ 4. multirun restart


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_restarted_multirun_skips_finished_jobs(tiny: TinyRun, trained: Path, tmp_path: Path) -> None:
    args = [str(ROOT / "unlearn.py"), "-m", f"train_run={trained}", "method=none,potion", "discovery.share=0.5",
            "logger=none"]
    first = _ok(_run(args, tmp_path, tiny.cache))
    assert "reused" not in first
    summaries = sorted((tmp_path / "runs" / "unlearn").glob("*/summary.json"))
    assert [p.parent.name.split("-")[0] for p in summaries] == ["none", "potion"]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in summaries}

    second = _ok(_run(args, tmp_path, tiny.cache))
    assert second.count("already finished; reused") == 2, second[-3000:]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in summaries} == stamps
    assert sorted((tmp_path / "runs" / "unlearn").glob("*/summary.json")) == summaries


# ------------------------------------------------------------------------------------------------ 5. caches


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_importance_key_covers_every_input(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = load_trained_run(trained)
    bundle = load_data(run.cfg.dataset)
    data = poison(bundle, run.plan)
    model = run.build_model(data.num_classes, data.channels).eval()
    discovery = discover(run.plan, share=0.5, seed=0)
    keys: list[str] = []

    def record(path: Path, compute: Callable[[], Any], enabled: bool = True) -> tuple[dict, bool]:
        keys.append(path.name)
        return {}, False

    monkeypatch.setattr(ssd_family, "cached_tensors", record)

    def keys_of(task: UnlearnTask, **kw: Any) -> tuple[str, str]:
        keys.clear()
        ssd_family.importance_pair(task, **{"loss": "logit_norm", "power": 1, "batch_size": 256, **kw})
        return keys[0], keys[1]  # (retain, forget)

    def task(**changes: Any) -> UnlearnTask:
        parts = {"model": model, "data": data, "discovery": discovery, **changes}
        return defender_task(**parts)

    def one_pixel(b: Any) -> Any:  # the same data set but for one pixel of one training image
        images = b.train.images.clone()
        images[0, 0, 0, 0] ^= 1
        return dataclasses.replace(b, train=dataclasses.replace(b.train, images=images))

    base = keys_of(task())
    assert keys_of(task()) == base and base[0] != base[1]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        next(moved.parameters()).view(-1)[0] += 1e-3
    trigger = dataclasses.replace(run.plan, trigger=TriggerSpec.from_config({**run.plan.trigger.to_dict(), "size": 2}))
    variants = {
        "weights": keys_of(task(model=moved)),
        "training images": keys_of(task(data=poison(one_pixel(bundle), run.plan))),
        "normalisation": keys_of(task(data=poison(dataclasses.replace(
            bundle, mean=tuple(m + 0.1 for m in bundle.mean), std=tuple(0.5 * v for v in bundle.std)), run.plan))),
        "trigger": keys_of(task(data=poison(bundle, trigger))),
        "forget/retain indices": keys_of(task(discovery=discover(run.plan, share=0.5, seed=1))),
        "loss": keys_of(task(), loss="logit_sqnorm"),
        "power": keys_of(task(), power=2),
        "batch size": keys_of(task(), batch_size=128),
    }
    for name, new in variants.items():
        assert new[0] != base[0] and new[1] != base[1], name
    subset = keys_of(task(), retain_samples=100)  # a retain subset changes the retain entry only
    assert subset[0] != base[0] and subset[1] == base[1]


def _write_images(root: Path, layout: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for rel, n in layout.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / rel / f"{i}.png")


def test_dataset_fingerprint_is_content_not_path(tmp_path: Path, cache: Path) -> None:
    # (a changed image is covered by test_sources.test_cache_hit_corrupt_and_content)
    layout = {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1}
    _write_images(tmp_path / "d", layout)
    first = sources.load_dataset("imagefolder", tmp_path / "d").fingerprint
    shutil.copytree(tmp_path / "d", tmp_path / "copy")
    assert sources.load_dataset("imagefolder", tmp_path / "copy").fingerprint == first  # same bytes, other path
    for split in ("train", "test"):  # same bytes, other labels
        (tmp_path / "copy" / split / "b").rename(tmp_path / "copy" / split / "c")
    relabelled = sources.load_dataset("imagefolder", tmp_path / "copy").fingerprint
    shutil.copy(tmp_path / "d" / "train" / "a" / "0.png", tmp_path / "d" / "train" / "a" / "extra.png")
    added = sources.load_dataset("imagefolder", tmp_path / "d").fingerprint
    assert len({first, relabelled, added}) == 3


def _importances() -> dict[str, torch.Tensor]:
    return {"w": torch.linspace(0, 1, 4096).view(64, 64), "b": torch.ones(3)}  # small: no intra-op threads


def test_parallel_writers_of_one_cache_entry(cache: Path) -> None:
    entry = importance_cache.entry_path("importance", test="parallel writers")
    ctx = multiprocessing.get_context("fork")  # fork: no second interpreter start-up on a busy machine
    barrier = ctx.Barrier(2)

    def fill() -> None:
        def compute() -> dict[str, torch.Tensor]:
            barrier.wait(timeout=60)  # both processes have missed the cache and will both write the entry
            return _importances()

        value, hit = importance_cache.cached_tensors(entry, compute)
        if hit or not torch.equal(value["w"], _importances()["w"]):
            os._exit(3)

    procs = [ctx.Process(target=fill) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert entry.parent == cache / "importance"
    value = load_tensors(entry)
    assert all(torch.equal(value[k], v) for k, v in _importances().items()) and set(value) == {"w", "b"}
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp file left behind


# ------------------------------------------------------------------------------------------------ 6. tracking failures


@pytest.mark.slow  # a subprocess
def test_unreachable_tracking_server_fails_before_training(tmp_path: Path, shared_cache: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "run"
    started = time.monotonic()
    proc = _run([str(ROOT / "train.py"), "experiment=quickstart", *SMALL_CNN, f"logger.tracking_uri={uri}",
                 f"out_dir={out}"],
                tmp_path, shared_cache, timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode != 0
    line = _one_error_line(proc)
    assert uri in line and "fallback" in line
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.slow  # trains
def test_unreachable_tracking_server_with_local_fallback_goes_on(tmp_path: Path, tracking_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """In process (the script's wiring is the test above): the local store is the working folder's."""
    from potion.pipelines.train import run_training

    monkeypatch.chdir(tracking_dir)
    uri = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "run"
    cfg = compose_config("train", ["experiment=quickstart", *SMALL_CNN, f"logger.tracking_uri={uri}",
                                   "logger.fallback=local", "train.iterations=2", "train.epoch_eval=false",
                                   f"out_dir={out}"])
    with caplog.at_level("WARNING", logger="potion"):
        summary = run_training(cfg)
    assert any("falling back to the local sqlite store" in r.getMessage()
               and str(tracking_dir / "mlflow.db") in r.getMessage() for r in caplog.records), caplog.text
    assert summary["mlflow_run_id"] == read_summary(out)["mlflow_run_id"]
    assert (tracking_dir / "mlflow.db").is_file()


@pytest.mark.slow  # trains
def test_tracking_failure_after_training_loses_nothing(tmp_path: Path, tracking_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines.train import run_training
    from potion.tracking.tracker import MlflowTracker

    calls = {"metrics": 0, "artifact": 0}

    def metrics(self: Any, values: Any, step: int | None = None) -> None:
        if step is None:  # the final metrics, logged after summary.json is written
            calls["metrics"] += 1
            raise RuntimeError("tracking store went away")

    def artifact(self: Any, path: Any, artifact_path: str | None = None) -> None:
        calls["artifact"] += 1
        raise RuntimeError("tracking store went away")

    monkeypatch.setattr(MlflowTracker, "log_metrics", metrics)
    monkeypatch.setattr(MlflowTracker, "log_artifact", artifact)
    out = tmp_path / "run"
    cfg = compose_config("train", ["experiment=quickstart", *SMALL_CNN, "logger=mlflow",
                                   f"logger.tracking_uri=sqlite:///{tracking_dir / 'mlflow.db'}", "train.iterations=2",
                                   "train.epoch_eval=false", f"out_dir={out}"])
    summary = run_training(cfg)
    assert calls["metrics"] == 1
    assert summary["mlflow_run_id"] and read_summary(out) == summary
    assert set(load_tensors(out / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ 7. input validation

STATIC_TRAIN = [
    ("poison.fraction=0", "poison.fraction"),
    ("poison.fraction=1.5", "poison.fraction"),
    ("poison.count=0", "poison.count"),
    ("poison.target=-1", "poison.target"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-0.1", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("model.width=-1", "model.width"),
]
DATA_TRAIN = [
    ("poison.count=100000", "poison.count"),
    ("poison.target=10", "poison.target"),
    ("poison.trigger.size=999", "poison.trigger.size"),
    ("poison.trigger.offset=[0,999]", "poison.trigger.offset"),
]


def _train_cfg(override: str, out: Path) -> Any:
    extra = ["poison.fraction=null"] if override.startswith("poison.count") else []
    return compose_config("train", ["experiment=quickstart", *SMALL_CNN, "logger=none", *extra, override,
                                    f"out_dir={out}"])


@pytest.mark.parametrize(("override", "key"), STATIC_TRAIN)
def test_bad_static_train_value_fails_before_data_is_read(override: str, key: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines import train as train_pipeline

    monkeypatch.setattr(train_pipeline, "load_data", lambda *a: pytest.fail("data read for a bad config"))
    with pytest.raises(ConfigError, match=re.escape(key)):
        train_pipeline.run_training(_train_cfg(override, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "key"), DATA_TRAIN)
def test_bad_train_value_for_the_data_fails_before_training(override: str, key: str, tmp_path: Path) -> None:
    from potion.pipelines.train import run_training

    with pytest.raises(ConfigError, match=re.escape(key)):
        run_training(_train_cfg(override, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("layout", "needle"), [
    ({"train/a": 0, "test/a": 0}, "no images found"),
    ({"train/a": 1, "train/b": 1, "test/a": 1, "test/c": 1}, "train and test classes differ"),
])
def test_bad_image_folder_is_a_data_error(layout: dict[str, int], needle: str, tmp_path: Path) -> None:
    from potion.pipelines.train import run_training

    _write_images(tmp_path / "data", layout)
    cfg = compose_config("train", ["dataset=imagefolder", f"dataset.path={tmp_path / 'data'}", "logger=none",
                                   f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=needle):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


STATIC_UNLEARN = [
    (["discovery.share=0"], "discovery.share"),
    (["discovery.share=1.5"], "discovery.share"),
    (["discovery.count=0"], "discovery.count"),
    (["method.ptn.rho=1.5"], "method.ptn.rho"),
    (["method.ptn.rho=-0.1"], "method.ptn.rho"),
    (["method.ptn.s_step=1.0"], "method.ptn.s_step"),
    (["method.name=nope"], "method.name=nope: unknown method; choose one of ["),
]


@pytest.mark.parametrize(("overrides", "key"), STATIC_UNLEARN)
def test_bad_static_unlearn_value_fails_before_the_run_is_read(overrides: list[str], key: str,
                                                               tmp_path: Path) -> None:
    from potion.pipelines.unlearn import run_unlearning

    missing = tmp_path / "no-such-run"  # reading the run would be a CheckpointError, not a ConfigError
    cfg = compose_config("unlearn", [f"train_run={missing}", "logger=none", *overrides])
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        run_unlearning(cfg)
    if key.startswith("method.name"):
        assert "'potion'" in str(info.value) and "'ssd'" in str(info.value)


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_discovery_count_above_n_p_names_the_key(trained: Path, tmp_path: Path) -> None:
    n_p = read_json(trained / "summary.json")["n_p"]
    with pytest.raises(ConfigError, match=rf"discovery.count={n_p + 1}: .*\[1, {n_p}\]"):
        _unlearn_in_process(trained, tmp_path / "u", f"discovery.count={n_p + 1}")
    assert not (tmp_path / "u").exists()


# ------------------------------------------------------------------------------------------------ 8. determinism


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_same_seed_same_poison_plan_and_discovered_set(tiny: TinyRun, trained: Path, tmp_path: Path) -> None:
    cfg = compose_config("train", _train_args(tiny, tmp_path / "unused"))
    bundle = load_data(cfg.dataset)
    for i in range(2):
        write_plan(tmp_path / str(i), plan_from_config(bundle, cfg.poison))
    saved = (trained / "poison_plan.json").read_bytes()
    assert (tmp_path / "0" / "poison_plan.json").read_bytes() == saved
    assert (tmp_path / "1" / "poison_plan.json").read_bytes() == saved
    other = plan_from_config(bundle, compose_config("train", _train_args(tiny, tmp_path / "unused", "seed=1")).poison)
    plan = load_trained_run(trained).plan
    assert other.indices != plan.indices  # the seed matters, so the equality above is not vacuous

    a, b = discover(plan, share=0.5, seed=0), discover(plan, share=0.5, seed=0)
    assert torch.equal(a.forget_idx, b.forget_idx) and torch.equal(a.retain_idx, b.retain_idx)
    assert not torch.equal(a.forget_idx, discover(plan, share=0.5, seed=1).forget_idx)
    smaller = discover(plan, share=0.25, seed=0)
    assert torch.equal(smaller.forget_idx, a.forget_idx[: smaller.n_f])  # nested sets


@pytest.mark.slow  # pipeline runs on the session's tiny model
def test_two_cpu_unlearning_runs_give_identical_metrics(trained: Path, tmp_path: Path) -> None:
    runs = [_unlearn_in_process(trained, tmp_path / f"u{i}", "method.importance.cache=false") for i in range(2)]
    assert runs[0]["run_dir"] != runs[1]["run_dir"]
    assert _metrics(runs[0]) == _metrics(runs[1])
    assert runs[0]["asr"] < runs[0]["asr_before"]  # it did heal: identical is not trivially "unchanged"
