"""Shared entry-script behaviour: quiet logs, one clear line and a non-zero exit for user errors."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from potion.config.compose import check_command_line
from potion.core.errors import PotionError

EXIT_USER_ERROR = 2


def quiet_third_party() -> None:
    """Keep the console to what a user needs: our lines, not framework chatter."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("lightning", "pytorch_lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "alembic",
                 "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)


_FAST_EXIT = False


def fast_exit() -> None:
    """Skip the interpreter's last garbage collection of the whole heap when the process ends.

    With torch, MLflow and SQLAlchemy loaded that pass costs about a second of every command's wall
    time on this project's CPU machine. It only frees memory the OS
    takes back anyway: ``gc.freeze`` runs as the last atexit handler, after MLflow's, loky's and
    logging's, and objects are still released by reference counting (open files closed, outputs written
    atomically before that).
    """
    global _FAST_EXIT
    if not _FAST_EXIT:
        _FAST_EXIT = True
        atexit.register(gc.freeze)  # atexit runs last-registered first: register early, run late


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a PotionError ends the process with ``error: <one line>`` and exit code 2."""
    try:
        return fn()
    except PotionError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)


def check_before_hydra(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Compose and check the command line's config before Hydra starts a job (``argv``: default sys.argv[1:]).

    A bad value, an unknown key or option and Hydra's own composition errors end here in one ``error:``
    line with exit code 2, before torch, Lightning or MLflow are imported and before any run is created.
    """
    run_guarded(lambda: check_command_line(config_name, sys.argv[1:] if argv is None else list(argv)))
