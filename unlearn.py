"""Heal a poisoned model: ``python unlearn.py train_run=<run folder> method=potion discovery.share=0.1``."""

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from potion.cli import check_before_hydra, fast_exit, quiet_third_party, run_guarded


# An absolute config path, so the configs are found also when sweep.py imports this module.
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="unlearn")
def main(cfg: DictConfig) -> Any:
    """Run one unlearning (or, inside `python sweep.py`, one PTN job); return its summary (Hydra's JobReturn)."""
    from potion.core import progress
    from potion.core.interrupt import exit_when_interrupted
    from potion.sweep.jobs import dispatch
    from potion.sweep.protocol import CANDIDATE, PREPARE, job_role

    quiet_third_party()
    fast_exit()
    progress.configure(cfg.trainer.progress_bar)
    role = job_role(cfg)
    if role is None:
        # SIGTERM: one line, exit 143, the MLflow run marked KILLED
        s = exit_when_interrupted(lambda: run_guarded(lambda: dispatch(cfg)),
                                  "rerun the same command to run it again")
    else:  # a job of the ptn sweeper: an error travels back to the sweeper in Hydra's JobReturn, and the
        # sweeper reports the search (a line per round), so the job keeps to warnings
        with progress.quiet_loggers("potion"):
            s = dispatch(cfg)
    if role in (PREPARE, CANDIDATE):
        return s
    if s.get("logged"):
        print(f"{s['method']}: already in the store at this commit (MLflow run {s['mlflow_run_id']}); skipped")
        return s
    print(f"run folder: {s['run_dir']}" + ("  (already finished; reused)" if s.get("reused") else ""))
    print(f"{s['method']}: n_f={s['n_f']}/{s['n_p']}  clean_acc {s['clean_acc_before']:.4f} -> {s['clean_acc']:.4f}  "
          f"asr {s['asr_before']:.4f} -> {s['asr']:.4f}  healed={_f(s['healed'])}  acc_drop={_f(s['acc_drop'])}  "
          f"seconds={s['unlearn_seconds']:.2f}")
    if s.get("ptn_note"):
        print(f"note: {s['ptn_note']}")
    return s


def _f(x: object) -> str:
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    check_before_hydra("unlearn")  # a bad value or option: one line, before torch is imported
    main()
