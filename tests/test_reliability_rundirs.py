"""Run folders are never silently reused for something else, and what is read back from them is checked.

- an explicit ``out_dir`` holding another config is refused (``force=true``: from scratch, never a resume);
- ``unlearn.py`` never writes over a training run (or any other kind of run);
- every file a run folder holds (checkpoint, summary, config.yaml, poison plan) that is not what this project
  wrote ends in one ``error:`` line, not a traceback, and before an MLflow run is created;
- temp files a killed writer left are cleaned up by the next run on that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from potion.config.compose import compose_config
from potion.core.errors import CheckpointError, ConfigError
from potion.core.io import load_tensors, read_json, sha256_file
from potion.pipelines.run_folders import identify_run, load_trained_run, read_summary

pytestmark = pytest.mark.slow  # trains tiny models, starts subprocesses
ROOT = Path(__file__).resolve().parents[1]
FAST = ["experiment=quickstart", "model=small_cnn", "model.width=8", "logger=none", "train.iterations=4",
        "train.epoch_eval=false", "train.checkpoint_every_n_steps=2"]
UNLEARN = ["method=none", "discovery.share=0.5", "logger=none", "suspects.enabled=false"]


def _train(out: Path, *extra: str) -> dict[str, Any]:
    from potion.pipelines.train import run_training

    return run_training(compose_config("train", [*FAST, f"out_dir={out}", *extra]))


def _unlearn(train_run: Path, out: Path, *extra: str) -> dict[str, Any]:
    from potion.pipelines.unlearn import run_unlearning

    return run_unlearning(compose_config("unlearn", [f"train_run={train_run}", *UNLEARN, f"out_dir={out}", *extra]))


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(cache))
    monkeypatch.setenv("POTION_THREADS", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(cache))
        mp.setenv("POTION_THREADS", "1")
        _train(out)
    return out


@pytest.fixture
def no_tracker(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if an MLflow run would be started (errors must come before it); returns the call log."""
    from potion.pipelines import lifecycle

    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append("start_tracker")
        raise AssertionError("an MLflow run was started before the error")

    monkeypatch.setattr(lifecycle, "start_tracker", refuse)  # where train, unlearn and heal start their runs
    return calls


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


# ------------------------------------------------------------------------------------------------ item 4


def test_out_dir_with_another_config_is_refused(trained: Path, tmp_path: Path, no_tracker: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _fingerprint(run)
    for change in ("train.lr=0.01", "model.width=4"):  # refused in one line, nothing resumed
        with pytest.raises(ConfigError, match="another config|not of this config") as info:
            _train(run, change)
        assert "force=true" in _one_line(info.value) and str(run) in str(info.value)
    assert _fingerprint(run) == before


def test_unfinished_run_of_another_config_is_refused_too(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()  # killed mid-training: only run.json, config, plan and checkpoints
    with pytest.raises(ConfigError, match="force=true"):
        _train(run, "train.lr=0.01")
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_force_trains_from_scratch_never_resumes(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    summary = _train(run, "train.lr=0.01", "force=true")
    assert summary["resumed"] is False and summary.get("reused") is None
    assert read_summary(run)["config_hash"] == summary["config_hash"] != read_json(trained / "summary.json")[
        "config_hash"]
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    # the same config with force: retrained from scratch too, not resumed from the final checkpoint
    again = _train(run, "train.lr=0.01", "force=true")
    assert again["resumed"] is False and again.get("reused") is None
    assert _train(run, "train.lr=0.01")["reused"] is True


def test_refusal_is_one_error_line_from_train_py(trained: Path, tmp_path: Path, cache: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    env = {**os.environ, "POTION_CACHE_DIR": str(cache), "POTION_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *FAST, "train.lr=0.01", f"out_dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "force=true" in lines[0], proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ item 5


def test_unlearn_never_writes_over_a_training_run(trained: Path, tmp_path: Path, no_tracker: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _fingerprint(run)
    for force in ("force=false", "force=true"):
        with pytest.raises(ConfigError, match="holds a training run") as info:
            _unlearn(run, run, force)  # the training run's model stays as it was
        _one_line(info.value)
    assert _fingerprint(run) == before


def test_unlearn_refuses_another_unlearning_config_and_train_refuses_an_unlearning_run(
        trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "u"
    first = _unlearn(trained, out)
    assert identify_run(out).kind == "unlearn"
    with pytest.raises(ConfigError, match="force=true"):
        _unlearn(trained, out, "discovery.share=1.0")
    assert read_summary(out) == first
    with pytest.raises(ConfigError, match="holds an unlearning run"):
        _train(out, "force=true")
    again = _unlearn(trained, out, "discovery.share=1.0", "force=true")
    assert again["n_f"] != first["n_f"] and read_summary(out)["config_hash"] == again["config_hash"]


# ------------------------------------------------------------------------------------------------ resume checkpoints


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def _ckpt_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _ckpt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _ckpt_state_dict_only(path: Path) -> None:
    torch.save(torch.load(path, weights_only=True)["state_dict"], path)


def _ckpt_pickle(path: Path) -> None:
    torch.save({"state_dict": {}, "payload": _Evil()}, path)


@pytest.mark.parametrize(("damage", "needle"), [(_ckpt_garbage, "corrupt or truncated"),
                                                (_ckpt_truncated, "corrupt or truncated"),
                                                (_ckpt_state_dict_only, "not a Lightning training checkpoint"),
                                                (_ckpt_pickle, "pickled objects")])
def test_bad_resume_checkpoint_is_one_line_before_tracking(trained: Path, tmp_path: Path, damage: Any, needle: str,
                                                          no_tracker: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()  # unfinished: the next call resumes
    damage(run / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=needle) as info:
        _train(run)
    assert "force=true" in _one_line(info.value) and no_tracker == []


def test_checkpoint_of_another_model_is_one_line(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()
    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: torch.zeros(3) for k in ckpt["state_dict"]}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        _train(run)


def test_stale_temp_files_of_a_killed_writer_are_removed(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()
    stale = [run / "checkpoints" / ".last.ckpt.k1l2m3.tmp", run / ".summary.json.x1y2.tmp"]
    for path in stale:
        path.write_bytes(b"")  # what SIGKILL during a write leaves
    _train(run)
    assert read_summary(run) is not None
    assert not [p for p in stale if p.exists()]


# ------------------------------------------------------------------------------------------------ summaries


@pytest.mark.parametrize("content", ["[]", '"x"', "3"])
def test_summary_that_is_not_an_object_is_one_line(trained: Path, tmp_path: Path, content: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").write_text(content)
    with pytest.raises(CheckpointError, match="not a run summary") as info:
        load_trained_run(run)
    _one_line(info.value)
    with pytest.raises(CheckpointError, match="not a run summary"):
        _train(run)  # one line naming the file


# ------------------------------------------------------------------------------------------------ config.yaml


def _edit_config(run: Path, how: str) -> None:
    import yaml

    path = run / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    if how == "empty":
        path.write_text("")
    elif how == "list":
        path.write_text("- a\n- b\n")
    elif how == "target":
        cfg["model"]["_target_"] = "os.system"
        path.write_text(yaml.safe_dump(cfg))
    elif how == "env":
        cfg["dataset"]["path"] = "${oc.env:HOME}"
        path.write_text(yaml.safe_dump(cfg))
    elif how == "recursive":
        cfg["name"] = "${name}"
        path.write_text(yaml.safe_dump(cfg))
    elif how == "resolver":
        cfg["name"] = "${nosuch:x}"
        path.write_text(yaml.safe_dump(cfg))
    elif how == "no dataset":
        del cfg["dataset"]
        path.write_text(yaml.safe_dump(cfg))
    elif how == "model argument":
        cfg["model"]["depth"] = 5
        path.write_text(yaml.safe_dump(cfg))
    elif how == "not yaml":
        path.write_text("a: [1,\n")


@pytest.mark.parametrize("how", ["empty", "list", "target", "env", "recursive", "resolver", "no dataset",
                                 "model argument", "not yaml"])
def test_bad_run_config_is_one_line_before_any_work(trained: Path, tmp_path: Path, how: str,
                                                    no_tracker: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _edit_config(run, how)
    with pytest.raises(CheckpointError, match="config.yaml") as info:
        _unlearn(run, tmp_path / "u")
    _one_line(info.value)
    assert not (tmp_path / "u").exists()


# ------------------------------------------------------------------------------------------------ poison plans


def _edit_plan(run: Path, **changes: Any) -> None:
    path = run / "poison_plan.json"
    plan = json.loads(path.read_text())
    for key, value in changes.items():
        plan[key] = value(plan) if callable(value) else value
    path.write_text(json.dumps(plan))


PLAN_PROBES = [
    ({"indices": lambda p: [-1, *p["indices"][1:]]}, "outside"),  # a negative index is outside, never wrapped
    ({"indices": lambda p: [p["indices"][0], *p["indices"][:-1]]}, "listed twice"),
    ({"indices": lambda p: [*p["indices"][:-1], p["num_train"]]}, "outside"),
    ({"true_labels": lambda p: p["true_labels"][:-1]}, "true_labels for"),
    ({"target": 99}, "class 99"),
    ({"num_train": lambda p: p["num_train"] + 7}, "drawn for"),
    ({"indices": lambda p: [str(i) for i in p["indices"]]}, "list of integers"),
    ({"true_labels": lambda p: [(y + 1) % 10 for y in p["true_labels"]]}, "differ from the data set"),
]


@pytest.mark.parametrize(("changes", "needle"), PLAN_PROBES)
def test_bad_poison_plan_is_one_line_before_tracking(trained: Path, tmp_path: Path, changes: dict[str, Any],
                                                     needle: str, no_tracker: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _edit_plan(run, **changes)
    with pytest.raises(CheckpointError, match=needle) as info:
        _unlearn(run, tmp_path / "u")
    assert "poison_plan.json" in _one_line(info.value)
    assert not (tmp_path / "u").exists() and no_tracker == []


def test_unlearning_still_works_on_a_good_run(trained: Path, tmp_path: Path) -> None:
    summary = _unlearn(trained, tmp_path / "u")
    assert summary["n_f"] >= 1 and set(load_tensors(tmp_path / "u" / "model.safetensors"))
