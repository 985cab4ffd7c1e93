"""Inter-process locks: one run folder is one lock, whatever spelling of its path a command was given."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from potion.pipelines.run_folders import run_lock

pytestmark = pytest.mark.slow  # a holder process that imports the heavy stack

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from pathlib import Path; from potion.pipelines.run_folders import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))")


def _hold(folder: Path, seconds: float, cache: Path) -> subprocess.Popen[str]:
    env = {"POTION_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_another_spelling_of_the_same_folder_waits_for_the_lock(tmp_path: Path, cache: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "other").mkdir()
    holder = _hold(tmp_path / "out", 2.0, cache)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING), run_lock(tmp_path / "other" / ".." / "out"):
            waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert waited > 1.0, "a second spelling of the folder did not wait for the first command's lock"
    assert any("waiting for it to finish" in r.getMessage() for r in caplog.records)


def test_a_dead_holders_lock_is_released_and_other_folders_never_wait(tmp_path: Path, cache: Path) -> None:
    holder = _hold(tmp_path / "out", 30.0, cache)
    try:
        started = time.monotonic()
        with run_lock(tmp_path / "elsewhere"):
            assert time.monotonic() - started < 1.0
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    with run_lock(tmp_path / "out"):  # the OS released the killed holder's lock
        assert time.monotonic() - started < 1.0
