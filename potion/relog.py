"""Log a finished run that its MLflow store lacks: ``python -m potion.relog <run folder> [--tracking-uri URI]``.

A PTN sweep whose tracking server went away still writes its final run folder; the tracking calls the
sweeper could not send wait there in ``mlflow_pending.json``, and the sweep's last lines print this command.
Run it once the server is back: the run is logged (a child of the sweep's run), ``summary.json`` names it
and the pending file is removed. The store is the one you name (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``,
else ``sqlite:///<current folder>/mlflow.db``), never the one the folder's record names, and only files inside
the run folder are uploaded. (A ``train.py`` or ``unlearn.py`` run is logged by running its command again: a
finished run that its store lacks is logged when it is reused.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from potion.cli import fast_exit, quiet_third_party, run_guarded


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m potion.relog", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the run folder holding mlflow_pending.json")
    p.add_argument("--tracking-uri", default=None,
                   help="the store to log to (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="how long one call to a server may try (seconds)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Log the folder's pending run; 0 on success, 2 with one ``error:`` line otherwise."""
    args = _parser().parse_args(argv)
    quiet_third_party()
    fast_exit()

    def work() -> None:
        from potion.tracking.runs import pending_uri, replay_pending
        from potion.tracking.uris import resolve_tracking_uri

        run_dir = Path(args.run_dir)
        wanted = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        meant = pending_uri(run_dir)
        if meant and meant != wanted:
            print(f"note: {run_dir} was meant for {meant}; logging to your store {wanted} "
                  f"(pass --tracking-uri {meant} to log it there)", flush=True)
        run_id, uri = replay_pending(run_dir, wanted, args.timeout_s)
        print(f"logged {args.run_dir} as MLflow run {run_id} in {uri}", flush=True)

    run_guarded(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
