"""The PTN search as a Hydra sweeper: ``hydra/sweeper=ptn`` (``python sweep.py <overrides>`` selects it).

The protocol only: check the command, then hand :func:`potion.sweep.driver.run_sweep` a function that launches
jobs through the configured launcher, whichever it is (basic, joblib, submitit, ...). The search, its jobs
and its MLflow runs are described there.

Hydra imports every module under ``hydra_plugins`` whenever it starts, so this module imports only Hydra
at the top; potion is imported when a sweep runs. (No ``from __future__ import annotations``: the scanner
runs this module before it is in sys.modules, where dataclasses look.)
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class PTNSweeperConf:
    """``hydra/sweeper=ptn``: ``batch_size`` candidate steps per round, ``steps_per_job`` of them per job
    (null: the whole round in one job; on a cluster, lower it to spread a round over nodes)."""

    _target_: str = "hydra_plugins.potion_ptn.ptn_sweeper.PTNSweeper"
    batch_size: int = 8
    steps_per_job: Optional[int] = None  # noqa: UP045 - Hydra's structured configs read typing.Optional


ConfigStore.instance().store(group="hydra/sweeper", name="ptn", node=PTNSweeperConf, provider="potion")


class PTNSweeper(Sweeper):
    """PTN search in rounds of candidate jobs, then one final job at the chosen step (see potion.sweep.driver)."""

    def __init__(self, batch_size: int = 8, steps_per_job: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.steps_per_job = steps_per_job
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self._next_job = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run the search; return every launch's job returns, the final job's last.

        The launcher's own log lines (each job's full override list, internal ``++ptn_job.*`` keys included, and
        reprs such as joblib's settings, every round) are silenced: the search prints one line per round.
        """
        from potion.cli import fast_exit, quiet_third_party, run_guarded
        from potion.core.progress import quiet_loggers

        quiet_third_party()
        fast_exit()
        with quiet_loggers(self._launcher_package()):
            return run_guarded(lambda: self._sweep(list(arguments)))

    def _launcher_package(self) -> str:
        """The logger of the launcher's package (``hydra_plugins.hydra_joblib_launcher``, ...), any launcher."""
        module = type(self.launcher).__module__
        return module.rpartition(".")[0] or module

    def _sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from potion.sweep.driver import SweepSettings, run_sweep
        from potion.sweep.protocol import check_ptn_config, check_sizes

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        steps_per_job = check_sizes(self.batch_size, self.steps_per_job)
        given = self._user_overrides(arguments)
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(arguments))
        check_ptn_config(cfg)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        settings = SweepSettings(self.batch_size, steps_per_job, type(self.launcher).__name__, given)
        return run_sweep(cfg, arguments, self._launch, settings, sweep_dir)

    def _launch(self, batch: list[list[str]]) -> Sequence[JobReturn]:
        """One launch of jobs, numbered on from the previous launch's."""
        assert self.launcher is not None
        self.validate_batch_is_legal(batch[:1])  # the jobs of a launch differ only in the steps k
        returns = self.launcher.launch(batch, initial_job_idx=self._next_job)
        self._next_job += len(batch)
        return returns

    def _user_overrides(self, arguments: list[str]) -> dict[str, Any]:
        """The command line's overrides as {key: value}; sweeps and the sweeper's own keys are refused."""
        from potion.core.errors import ConfigError
        from potion.sweep.protocol import SWEEPER_KEYS

        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        given: dict[str, Any] = {}
        for o in parser.parse_overrides(arguments):
            key = o.key_or_group
            if o.is_sweep_override():
                raise ConfigError(f"{o.get_key_element()}: the ptn sweeper runs one PTN search; give one value "
                                  "(sweep grids with `python unlearn.py -m ...`)")
            if any(key == k or key.startswith(k + ".") for k in SWEEPER_KEYS):
                raise ConfigError(f"{o.get_key_element()}: set by the ptn sweeper for each job; drop the override")
            given[o.get_key_element()] = "null" if o.is_delete() else o.get_value_element_as_str()
        return given
