"""Heal a model trained anywhere: ``python -m potion.heal checkpoint=<weights> dataset.path=<image folder>
discovered=<list> model=resnet9 model.width=0.25`` (see conf/heal.yaml and potion/pipelines/heal.py)."""

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from potion.cli import check_before_hydra, fast_exit, quiet_third_party, run_guarded
from potion.config.compose import CONF_DIR, check_config
from potion.core import progress


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="heal")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Heal, write the out folder, print where it is and the before/after line."""
    quiet_third_party()
    fast_exit()
    run_guarded(lambda: check_config("heal", cfg))  # every value, before torch is imported
    progress.configure(cfg.trainer.progress_bar)
    from potion.core.interrupt import exit_when_interrupted
    from potion.pipelines.heal import heal
    from potion.pipelines.heal_report import format_result

    command = list(HydraConfig.get().overrides.task)  # the report's next steps repeat the command line
    # SIGTERM: one line, exit 143, the MLflow run marked KILLED (as unlearn.py)
    summary = exit_when_interrupted(lambda: run_guarded(lambda: heal(cfg, command)),
                                    "rerun the same command to heal again")
    print(format_result(summary), flush=True)
    return summary


if __name__ == "__main__":
    check_before_hydra("heal")
    main()
