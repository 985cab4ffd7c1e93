"""Progress on long work (potion/core/progress.py): tqdm bars on stderr where Lightning's bar is not, one switch
(``trainer.progress_bar``: true / false / auto), on in a grid of Hydra's basic launcher and quiet where jobs share a
console (a sweep's console, a line per round and no launcher internals, is checked on tests/test_ptn_sweep.py's
sweeps)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from tiny_world import QUICK_PTN, train_overrides

from potion.core import progress
from potion.core.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def switch() -> Iterator[None]:
    """The command's switch as a test left it is reset afterwards (a module global)."""
    yield
    progress.configure("auto")


@pytest.fixture()
def every_step(monkeypatch: pytest.MonkeyPatch, switch: None) -> None:
    """Progress on, shown from the first step and a note every step: what a tiny loop shows."""
    progress.configure(True)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)


def _job(monkeypatch: pytest.MonkeyPatch, launcher: str) -> None:
    """Run as a Hydra multirun job of ``launcher``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "launcher": {"_target_": launcher}}})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)


def test_a_bar_shows_done_of_total_and_the_note() -> None:
    out = io.StringIO()
    bar = Progress("retrain", 100, show=True, every_s=0.0, stream=out)
    for _ in range(11):
        bar.advance(note=lambda: "retain loss 0.5000")
    bar.finish()
    last = out.getvalue().split("\r")[-1]
    assert last.startswith("retrain:  11%") and "11/100" in last and "retain loss 0.5000" in last


def test_a_short_loop_prints_nothing_and_off_prints_nothing() -> None:
    out = io.StringIO()
    with Progress("importance pass", 3, "batches", show=True, stream=out) as bar:
        for _ in range(3):
            bar.advance()
    assert out.getvalue() == ""  # done before the bar's delay
    off = Progress("x", 3, show=False, every_s=0.0, stream=out)
    off.advance(note="never shown")
    off.finish()
    assert out.getvalue() == ""


def test_a_search_says_it_may_stop_early() -> None:
    out = io.StringIO()
    bar = Progress("PTN search", 500, bound=True, show=True, every_s=0.0, stream=out)
    bar.advance(60)
    bar.finish("stopped at step k=59")
    last = out.getvalue().split("\r")[-1]
    assert last.startswith("PTN search (may stop early):") and "60/500" in last and "stopped at step k=59" in last


def test_the_switch_explicit_then_command_then_auto(monkeypatch: pytest.MonkeyPatch, switch: None) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()  # auto: stderr is a file or a pipe
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.enabled() and progress.enabled("auto")  # auto: a terminal
    assert not progress.enabled(False)
    progress.configure(False)
    assert not progress.enabled() and progress.enabled(True)  # an explicit value wins over the command's switch
    progress.configure("auto")
    with progress.quiet_auto():
        assert not progress.enabled() and progress.enabled(True)  # a sweep's candidate job: quiet unless asked


def test_auto_shows_a_grid_of_the_basic_launcher_and_not_jobs_sharing_a_console(
        monkeypatch: pytest.MonkeyPatch, switch: None) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "_told", False)
    _job(monkeypatch, BASIC)
    progress.configure("auto")
    assert progress.own_console() and progress.enabled()  # one job at a time: the console is this job's
    assert terminal.getvalue() == ""
    _job(monkeypatch, JOBLIB)
    progress.configure("auto")
    progress.configure("auto")  # the next job in the same worker
    assert not progress.own_console() and not progress.enabled()  # jobs side by side share one console
    assert terminal.getvalue().count("trainer.progress_bar=true") == 1  # said once, with how to turn bars on
    progress.configure(True)
    assert progress.enabled()  # the switch turns it on there too


def test_the_training_loop_reports_with_the_switch_on_and_not_off(every_step: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from potion.unlearning.training_based import SGDSettings, train_steps

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    sgd = SGDSettings(lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False, warmup=0.0, schedule="constant")

    def losses() -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            yield "retain", F.cross_entropy(model(x), y)

    train_steps(model, list(model.parameters()), losses(), 3, sgd, torch.device("cpu"), "retrain")
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("retrain: 100%") and "3/3" in last and "retain loss" in last
    progress.configure(False)
    train_steps(model, list(model.parameters()), losses(), 3, sgd, torch.device("cpu"), "retrain")
    assert capsys.readouterr().err == ""


def test_importance_passes_and_the_ptn_search_report(every_step: None, capsys: pytest.CaptureFixture[str]) -> None:
    from potion.unlearning.dampening import snapshot
    from potion.unlearning.importance import compute_importance
    from potion.unlearning.ptn import PTNSchedule, ptn_search

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    imp = compute_importance(model, batches, loss="logit_norm", power=1, what="retain importance", total=3)
    assert "retain importance: 100%" in capsys.readouterr().err
    originals = snapshot(model)
    schedule = PTNSchedule(s_start=1e-3, s_step=1.5, max_steps=5, rho=0.5)
    script = iter([0.9, 0.8, 0.2])
    ptn_search(model, originals, imp, {k: v * 2 for k, v in imp.items()}, schedule, lambda m: next(script), a0=1.0)
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("PTN search (may stop early):") and "3/5" in last
    assert "stopped at step k=2, forget_acc 0.2000" in last


# ------------------------------------------------------------------------------- commands (subprocesses)


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "POTION_CACHE_DIR": str(cache), "POTION_THREADS": "1"}


@pytest.mark.slow
def test_training_shows_lightnings_bar_with_the_switch_on(tiny, tmp_path: Path,  # noqa: ANN001
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """On with ``trainer.progress_bar=true`` even where the console is not a terminal (here: pytest's capture);
    ``auto`` into a pipe (no bar) is checked on the resumed train.py of tests/test_reliability.py."""
    from potion.config.compose import compose_config
    from potion.pipelines.train import run_training

    run_training(compose_config("train", train_overrides(tiny.data, tmp_path / "on", "train.epochs=1", "logger=none",
                                                         "trainer.progress_bar=true")))
    out = capsys.readouterr().out
    assert "Epoch 0" in out and "it/s" in out  # Lightning's bar (it writes to stdout)


@pytest.mark.slow
def test_a_failed_sweep_job_is_one_error_line_without_internals(tmp_path: Path, cache: Path) -> None:
    cmd = [sys.executable, "sweep.py", f"train_run={tmp_path / 'no_such_run'}", *QUICK_PTN, "logger=none",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"out_dir={tmp_path / 'final'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"error: train_run={tmp_path / 'no_such_run'}: no such run folder (give the "
                                        "folder train.py printed, or mlflow:<run id>)"]
    assert "++ptn_job" not in proc.stdout + proc.stderr
