"""Train a backdoor-poisoned classifier: ``python train.py experiment=quickstart`` (any value overridable)."""

import hydra
from omegaconf import DictConfig

from potion.cli import check_before_hydra, fast_exit, quiet_third_party, run_guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from potion.core import progress
    from potion.core.interrupt import exit_when_interrupted
    from potion.pipelines.train import run_training

    quiet_third_party()
    fast_exit()
    progress.configure(cfg.trainer.progress_bar)
    # SIGTERM: a checkpoint at the step, one line, exit 143 (never a silent exit 0)
    s = exit_when_interrupted(lambda: run_guarded(lambda: run_training(cfg)),
                              "rerun the same command to resume from the last checkpoint")
    if s.get("global_rank"):  # a DDP process besides rank 0: rank 0 reports the run
        return
    print(f"run folder: {s['run_dir']}" + ("  (already finished; reused)" if s.get("reused") else ""))
    print(f"clean_acc={s['clean_acc']:.4f}  poison_acc={s['poison_acc']:.4f}  asr={s['asr']:.4f}  "
          f"n_p={s['n_p']}  train_seconds={s['train_seconds']:.1f}")


if __name__ == "__main__":
    check_before_hydra("train")  # a bad value or option: one line, before torch is imported
    main()
