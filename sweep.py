"""PTN search as a Hydra multirun: ``python sweep.py <the same overrides as unlearn.py>``.

    python sweep.py train_run=runs/train/X method=potion discovery.share=0.1
    python sweep.py train_run=runs/train/X method=potion discovery.share=0.1 \\
        hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweeper.batch_size=8

This is unlearn.py's task run with ``--multirun hydra/sweeper=ptn`` (hydra_plugins/potion_ptn): the
sweeper creates an MLflow parent run, launches one job that computes the importances once into the
content-addressed cache, then rounds of ``hydra.sweeper.batch_size`` candidate steps k (default 8), in
jobs of ``hydra.sweeper.steps_per_job`` steps each (default: the whole round in one job), through the configured
launcher (``hydra/launcher=basic`` by default, ``joblib``, ``submitit_slurm``, ...); it stops at the
first round with a qualifying step and launches one final job that heals the model at the smallest
qualifying k (the in-process search's answer) with unlearn.py's full evaluation. Candidate and final
jobs are child runs of the parent (tag ``mlflow.parentRunId``), written by the sweeper: jobs never
open the tracking store. The sweep folder (``hydra.sweep.dir``) gets ``ptn_sweep.json`` and
``ptn_trajectory.csv``.

On a SLURM cluster (hydra-submitit-launcher) every job runs on another node, so the jobs must reach
the same importance cache and files as the sweeper; the tracking store only the sweeper needs:

    export POTION_CACHE_DIR=/shared/fs/potion-cache        # shared filesystem, seen by every node
    mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:////shared/fs/mlflow.db &
    python sweep.py train_run=/shared/fs/runs/train/X method=potion discovery.share=0.1 \\
        logger.tracking_uri=http://<server host>:5000 trainer=gpu \\
        hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> \\
        hydra.launcher.timeout_min=20 hydra.launcher.gpus_per_node=1 hydra.launcher.cpus_per_task=8 \\
        hydra.sweeper.batch_size=16 hydra.sweeper.steps_per_job=8

The sweeper's own work needs no torch and computes nothing, so with a cluster launcher it can run on a
login node: the importances are computed by the first job, on the jobs' device, so the cache entry is
the one the candidate jobs read. Keep ``train_run`` and ``out_dir`` on the shared filesystem too (the sweeper
copies the final run's files into MLflow from there). A shared server, not a sqlite file on NFS, is
the store to use for many concurrent sweeps.
"""

import sys

from potion.cli import check_before_hydra
from unlearn import main

SWEEPER = "hydra/sweeper"


def ptn_argv(args: list[str]) -> list[str]:
    """``args`` as a PTN multirun: add ``--multirun`` and ``hydra/sweeper=ptn`` unless already given."""
    out = list(args)
    if not any(a.lstrip("+~").split("=", 1)[0] in (SWEEPER, f"override {SWEEPER}") for a in out):
        out.insert(0, f"{SWEEPER}=ptn")
    if not any(a in ("-m", "--multirun") for a in out):
        out.insert(0, "--multirun")
    return out


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *ptn_argv(sys.argv[1:])]
    check_before_hydra("unlearn")
    main()
