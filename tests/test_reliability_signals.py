"""A terminated run says so: SIGTERM (a scheduler's stop) is exit 143 with one line, never a silent exit 0.

Training stops at the end of the current step, writes its checkpoint there and marks its MLflow run KILLED;
the same command resumes it. Unlearning stops where it is (outputs are atomic) with the same exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from potion.config.compose import compose_config
from potion.core import interrupt
from potion.core.io import read_json

pytestmark = pytest.mark.slow  # trains tiny models, starts subprocesses
ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["experiment=quickstart", "model=small_cnn", "model.width=8", "logger=none", "train.epochs=2",
              "train.lr=0.01", "train.checkpoint_every_n_steps=5", "train.epoch_eval=false"]

# Runs a script with every training step slowed down, and writes a file once the first checkpoint is on
# disk: the test then sends SIGTERM while the fit is surely in progress.
_SLOW_CHILD = """
import os, pathlib, runpy, sys, time
import potion.pipelines.lightning_module as training
sig = pathlib.Path(os.environ["POTION_TEST_SIGNAL"])
save, step = training.AtomicCheckpointIO.save_checkpoint, training.PoisonTrainingModule.training_step

def save_and_tell(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    sig.write_text(str(path))

def slow_step(self, batch, batch_idx):
    time.sleep(0.1)
    return step(self, batch, batch_idx)

training.AtomicCheckpointIO.save_checkpoint = save_and_tell
training.PoisonTrainingModule.training_step = slow_step
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def _env(cache: Path, sig: Path) -> dict[str, str]:
    env = {**os.environ, "POTION_CACHE_DIR": str(cache), "POTION_THREADS": "1", "POTION_TEST_SIGNAL": str(sig),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _terminate_when(args: list[str], cwd: Path, env: dict[str, str], sig: Path, timeout: float = 120
                    ) -> subprocess.CompletedProcess[str]:
    """Start ``python args``, wait for the file ``sig``, send SIGTERM, and collect the outcome."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not sig.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"child ended (rc {proc.returncode}) before the signal point:\n{(out + err)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("child never reached the signal point")
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _interrupted_line(proc: subprocess.CompletedProcess[str]) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, text[-3000:]
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines()), text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_sigterm_stops_training_with_143_a_checkpoint_and_a_resumable_run(tmp_path: Path, cache: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = [str(ROOT / "train.py"), *TRAIN_ARGS, f"out_dir={out}"]
    sig = tmp_path / "checkpointed"
    proc = _terminate_when(["-c", _SLOW_CHILD, *args], tmp_path, _env(cache, sig), sig)

    assert proc.returncode == 143, proc.stdout + proc.stderr  # 128 + SIGTERM: a kill never reads as success
    line = _interrupted_line(proc)
    assert "SIGTERM" in line and "rerun the same command to resume" in line
    assert not (out / "summary.json").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert 5 <= ckpt["global_step"] < 2 * 23  # written where it stopped: after the first checkpoint, before the end

    # the same settings resume (in process: train.py's own rerun is tests/test_reliability.py's resume test)
    from potion.pipelines.train import run_training

    monkeypatch.setenv("POTION_CACHE_DIR", str(cache))
    summary = run_training(compose_config("train", [*TRAIN_ARGS, f"out_dir={out}"]))
    assert summary["resumed"] is True and summary["steps"] == 2 * 23 == read_json(out / "summary.json")["steps"]


_UNLEARN_CHILD = """
import os, pathlib, runpy, signal, sys, time
import potion.unlearning.registry as registry
sig = pathlib.Path(os.environ["POTION_TEST_SIGNAL"])
run_timed = registry.run_timed

def stall(method_fn, task, args):  # the method is running: tell the test and wait for its signal
    sig.write_text("in the method")
    time.sleep(60)
    return run_timed(method_fn, task, args)

import potion.pipelines.unlearn as pipeline
pipeline.run_timed = stall
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def test_sigterm_stops_unlearning_with_143_and_one_line(tmp_path: Path, cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines.train import run_training

    monkeypatch.setenv("POTION_CACHE_DIR", str(cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    trained = tmp_path / "train"
    run_training(compose_config("train", [*TRAIN_ARGS, "train.iterations=2", f"out_dir={trained}"]))
    out = tmp_path / "unlearn"
    sig = tmp_path / "in-method"
    proc = _terminate_when(["-c", _UNLEARN_CHILD, str(ROOT / "unlearn.py"), f"train_run={trained}",
                            "method=potion", "discovery.share=0.5", "logger=none", f"out_dir={out}"],
                           tmp_path, _env(cache, sig), sig)
    assert proc.returncode == 143, proc.stdout + proc.stderr  # 128 + SIGTERM, after a word on the console
    assert "SIGTERM" in _interrupted_line(proc)
    assert not (out / "summary.json").exists()


def test_sigterm_in_process_marks_the_run_killed_and_restores_the_handlers(tmp_path: Path, cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines import lifecycle
    from potion.pipelines import lightning_module as training
    from potion.pipelines import train as train_pipeline
    from potion.tracking.tracker import RecordingTracker

    monkeypatch.setenv("POTION_CACHE_DIR", str(cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    recorder = RecordingTracker("recorded")  # remembers how its run ended
    monkeypatch.setattr(lifecycle, "start_tracker", lambda *a, **k: recorder)
    step = training.PoisonTrainingModule.training_step

    def signal_at_step_3(self: Any, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(training.PoisonTrainingModule, "training_step", signal_at_step_3)
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    out = tmp_path / "run"
    with pytest.raises(interrupt.Interrupted) as info:
        train_pipeline.run_training(compose_config("train", [*TRAIN_ARGS, f"out_dir={out}"]))
    assert info.value.exit_code == 143 and "step 4" in str(info.value)  # the step in progress completed
    assert recorder.status == "KILLED"  # not FAILED, not left RUNNING
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
