"""The PTN search as a Hydra sweeper: ``hydra/sweeper=ptn`` (``python sweep.py <overrides>`` selects it).

PTN's candidates s_k = s_start * s_step^k are fixed in advance, so the sweeper evaluates them in rounds
of ``batch_size`` consecutive steps, each round one ``launcher.launch`` of candidate jobs (any Hydra
launcher: basic, joblib, submitit), each job evaluating ``steps_per_job`` of them (its start-up, the
importances read once, shared by its steps; see PTNSweeperConf for the default). It stops after the
first round that holds a qualifying step (forget_acc <= rho * a0) and takes the smallest qualifying k
there: every earlier step was evaluated in an earlier round and failed, so the answer is the in-process
search's. If no step qualifies within ``method.ptn.max_steps`` the last step is used and the parent run
records ``ptn_reached=0``, as the in-process search does. One final job then heals the model at that
step with the full evaluation.

The sweeper first creates the MLflow store, experiment and parent run, then launches one ``prepare``
job that computes the importances once into the content-addressed cache (every later job reads them
from there) and measures a0; being a launcher job, it runs where the candidates run (their device,
their cache entry), and the sweeper's own code never imports torch (``potion.ptn_sweep``), so with a
cluster launcher it can sit on a login node. Candidate jobs only compute and return their values; the
sweeper writes each candidate's child run itself through the parent's client, and the final job records
its tracking calls and returns them for the sweeper to replay into a child run it created: one writer to
the store, and no job imports MLflow or needs to reach the tracking server. With the joblib launcher the
worker pool is started (imports, data) while the sweeper opens the store, and its idle workers are
stopped when the sweep ends instead of tearing down one by one at exit.

Overrides this sweeper adds to its jobs: ``++ptn_job.role=prepare|candidate|final``,
``++ptn_job.parent_run_id=<parent MLflow run id>``, the steps of a candidate job
(``++ptn_job.steps=[k, ...]``), and for the final job ``method.ptn.fixed_step=<k>`` and
``++ptn_job.run_id=<the child run created for it>``.

Hydra imports every module under ``hydra_plugins`` whenever it starts, so this module imports only
Hydra at the top; potion is imported when a sweep runs (torch only by jobs the basic launcher runs in
this process). (No ``from __future__ import annotations``: the scanner runs this module before it is in
sys.modules, where dataclasses look.)
"""

import csv
import io
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Metrics of the final (healed) run repeated on the parent, so a sweep reads as one row in the MLflow UI.
FINAL_METRICS = ("clean_acc", "asr", "poison_acc", "healed", "acc_drop", "forget_acc", "clean_acc_before",
                 "asr_before")


@dataclass
class PTNSweeperConf:
    """``hydra/sweeper=ptn``: ``batch_size`` candidate steps per round, ``steps_per_job`` of them per job.

    ``steps_per_job=null`` (auto): the whole round in one job with the basic launcher (its jobs run one
    after another in this process anyway), the round split evenly over the workers with joblib, one step
    per job with other launchers (a cluster: raise it where a job's start-up costs more than its steps).
    """

    _target_: str = "hydra_plugins.potion_ptn.ptn_sweeper.PTNSweeper"
    batch_size: int = 8
    steps_per_job: Optional[int] = None  # noqa: UP045 - Hydra's structured configs read typing.Optional


ConfigStore.instance().store(group="hydra/sweeper", name="ptn", node=PTNSweeperConf, provider="potion")


class PTNSweeper(Sweeper):
    """PTN search in rounds of candidate jobs, then one final job at the chosen step (see the module doc)."""

    def __init__(self, batch_size: int = 8, steps_per_job: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.steps_per_job = steps_per_job
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self._pending: Path | None = None  # the final run folder whose tracking waits for potion.relog

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run the search; return every round's job returns, the final job's last."""
        from potion.cli import fast_exit, quiet_third_party, run_guarded

        quiet_third_party()
        fast_exit()
        return run_guarded(lambda: self._sweep(list(arguments)))

    # ----------------------------------------------------------------------------------------------

    def _sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from potion import ptn_sweep
        from potion.errors import ConfigError
        from potion.tracking import start_tracker

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"hydra.sweeper.batch_size={self.batch_size}: must be a positive integer "
                              "(candidate steps launched per round)")
        spj = self.steps_per_job
        if spj is not None and (isinstance(spj, bool) or not isinstance(spj, int) or spj < 1):
            raise ConfigError(f"hydra.sweeper.steps_per_job={spj}: must be a positive integer or null (auto: "
                              "by the launcher's parallelism)")
        given = self._user_overrides(arguments)
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(arguments))
        ptn_sweep.check_ptn_config(cfg)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        t0 = time.perf_counter()
        warming = self._prewarm(cfg)
        method = str(cfg.method.name)
        launcher = type(self.launcher).__name__
        try:
            # The store, experiment and parent run exist before any job starts; every run of the sweep is
            # written by this process (the jobs return their values).
            parent = start_tracker(cfg.get("logger"), experiment="potion", run_name=f"ptn-sweep-{method}",
                                   tags={"potion.task": "ptn_sweep", "potion.method": method,
                                         "potion.launcher": launcher, "potion.sweep_dir": str(sweep_dir)})
            try:
                parent.log_params({"override": given, "sweeper": {
                    "batch_size": self.batch_size, "launcher": launcher, "steps_per_job": self._steps_per_job()}})
                returns = self._search(cfg, arguments, parent, sweep_dir, t0, warming)
            except BaseException as exc:
                parent.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
                raise
            parent.finish("FINISHED")
            return returns
        finally:
            self._release_workers()

    def _user_overrides(self, arguments: list[str]) -> dict[str, str]:
        """The command line's overrides as {key: value}; sweeps and the sweeper's own keys are refused."""
        from potion.errors import ConfigError
        from potion.ptn_sweep import SWEEPER_KEYS

        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        given: dict[str, str] = {}
        for o in parser.parse_overrides(arguments):
            key = o.key_or_group
            if o.is_sweep_override():
                raise ConfigError(f"{o.get_key_element()}: the ptn sweeper runs one PTN search; give one value "
                                  "(sweep grids with `python unlearn.py -m ...`)")
            if any(key == k or key.startswith(k + ".") for k in SWEEPER_KEYS):
                raise ConfigError(f"{o.get_key_element()}: set by the ptn sweeper for each job; drop the override")
            given[o.get_key_element()] = "null" if o.is_delete() else o.get_value_element_as_str()
        return given

    def _steps_per_job(self) -> int:
        """hydra.sweeper.steps_per_job, or (null) what suits the launcher: see PTNSweeperConf."""
        if self.steps_per_job is not None:
            return int(self.steps_per_job)
        name = type(self.launcher).__name__
        if name == "BasicLauncher":
            return self.batch_size
        if name == "JoblibLauncher":
            n = int(self.launcher.joblib.get("n_jobs") or 1)  # type: ignore[attr-defined]
            workers = n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)  # joblib: -1 = all cores, -2 = all but one
            return -(-self.batch_size // workers)
        return 1

    def _launch(self, batch: list[list[str]], job_idx: int) -> Sequence[JobReturn]:
        assert self.launcher is not None
        # Jobs of a batch differ only in the step k, so composing one shows the batch is legal (a Hydra
        # composition costs ~0.1-0.3 s; the launcher composes every job again anyway).
        self.validate_batch_is_legal(batch[:1])
        return self.launcher.launch(batch, initial_job_idx=job_idx)

    def _prewarm(self, cfg: DictConfig) -> Any:
        """With Hydra's joblib launcher, start its worker pool now (in a thread) so the workers import torch
        and load the job inputs while this process opens the MLflow store; None for other launchers.

        The warm-up goes through ``joblib.Parallel`` with the launcher's own settings, so the launcher's
        first ``Parallel`` call reuses these (loky's reusable executor) instead of starting cold workers.
        """
        if type(self.launcher).__name__ != "JoblibLauncher":
            return None
        import threading

        try:  # the launcher's own argument preparation (a private helper: without it, skip the warm-up)
            from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
        except ImportError:
            return None
        from joblib import Parallel, delayed

        from potion import ptn_sweep

        settings = dict(self.launcher.joblib)  # type: ignore[attr-defined]
        settings["backend"] = "loky"  # exactly as the launcher's own launch() prepares them
        process_joblib_cfg(settings)
        plain = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                 for k, v in ((k, cfg.get(k)) for k in ptn_sweep.INPUT_KEYS)}
        n = settings.get("n_jobs") or 1
        n = n if n > 0 else (os.cpu_count() or 1)

        def warm() -> None:
            try:
                Parallel(**settings)(delayed(ptn_sweep.warm_worker)(plain) for _ in range(n))
            except Exception as exc:  # only a head start; the real jobs report real errors
                log.debug("joblib worker warm-up failed: %s", exc)

        thread = threading.Thread(target=warm, name="ptn-joblib-warmup", daemon=True)
        thread.start()
        return thread

    def _release_workers(self) -> None:
        """With the joblib launcher, stop its (now idle) worker pool at once.

        Left to the interpreter's exit, loky lets every worker tear down torch in turn (~2 s on the
        quickstart); the jobs are finished and their outputs written, so nothing is lost. A private
        loky detail (the reusable executor): without it, the pool is left to exit as before.
        """
        if type(self.launcher).__name__ != "JoblibLauncher":
            return
        try:
            from joblib.externals.loky import reusable_executor
        except ImportError:
            return
        executor = getattr(reusable_executor, "_executor", None)
        if executor is not None:
            try:
                executor.shutdown(wait=True, kill_workers=True)
            except Exception as exc:  # noqa: BLE001 - only a faster exit
                log.debug("stopping the joblib workers failed: %s", exc)

    def _search(self, cfg: DictConfig, arguments: list[str], parent: Any, sweep_dir: Path, t0: float,
                warming: Any = None) -> list[Sequence[JobReturn]]:
        from potion import ptn_sweep

        pid = parent.run_id
        if warming is not None:
            warming.join()  # the launcher's first call must find the pool idle, not racing the warm-up
        returns: list[Sequence[JobReturn]] = [
            self._launch([[*arguments, *ptn_sweep.job_overrides(None, ptn_sweep.PREPARE, pid)]], 0)]
        prep = returns[0][0].return_value  # re-raises the prepare job's error
        sched, a0, threshold = prep["schedule"], prep["a0"], prep["threshold"]
        parent.log_params({"method": str(cfg.method.name), "n_f": prep["n_f"], "n_p": prep["n_p"],
                           "ptn": {**sched, "threshold": threshold}})
        parent.log_metrics({"ptn_a0": a0, "ptn_threshold": threshold, "importance_seconds": prep["importance_seconds"],
                            "prepare_seconds": prep["prepare_seconds"],
                            "prepare_importance_cache_hit": prep["importance_cache_hit"]})
        batch_size, max_steps = self.batch_size, int(sched["max_steps"])
        log.info("PTN sweep: a0=%.4f, threshold=%.4f, up to %d steps in rounds of %d", a0, threshold, max_steps,
                 batch_size)

        evaluated, chosen, job_idx, recomputed = self._rounds(cfg, arguments, parent, prep, returns)
        rounds = len(returns) - 1
        reached = chosen is not None
        if chosen is None:  # as the in-process search: keep the last step
            chosen = max(evaluated, key=lambda c: c.step)
            log.warning("PTN sweep: rho=%s never met in %d steps; the final run uses the last step k=%d",
                        sched["rho"], max_steps, chosen.step)

        final, summary = self._final(cfg, arguments, parent, chosen.step, job_idx)
        returns.append(final)
        wall = time.perf_counter() - t0
        if summary.get("ptn_forget_acc") is not None and abs(summary["ptn_forget_acc"] - chosen.forget_acc) > 1e-9:
            log.warning("PTN sweep: the final job's forget_acc at k=%d is %.6f, the candidate's was %.6f "
                        "(non-deterministic evaluation?)", chosen.step, summary["ptn_forget_acc"], chosen.forget_acc)

        result = {
            "ptn_chosen_step": chosen.step, "ptn_steps": chosen.step + 1, "ptn_s": chosen.s, "ptn_alpha": chosen.alpha,
            "ptn_percentile": chosen.percentile, "ptn_dampened_share": chosen.dampened_share,
            "ptn_forget_acc": chosen.forget_acc, "ptn_reached": reached, "ptn_steps_evaluated": len(evaluated),
            "ptn_rounds": rounds, "ptn_wall_seconds": wall, "ptn_jobs_recomputed_importance": recomputed,
            "ptn_a0": a0, "ptn_threshold": threshold,
        }
        parent.log_metrics({**result, **{k: summary.get(k) for k in FINAL_METRICS}})
        parent.set_tags({"potion.final_run_id": summary.get("mlflow_run_id"),
                         "potion.final_run_dir": summary.get("run_dir"),
                         "potion.final_reused": bool(summary.get("reused", False))})
        for path in self._write_outputs(sweep_dir, result, evaluated, summary, prep):
            parent.log_artifact(path)
        self._warn_tracking_lost(parent, sweep_dir)
        print(f"PTN sweep ({type(self.launcher).__name__}, rounds of {batch_size}): k={chosen.step} "
              f"s={chosen.s:.4g} alpha={chosen.alpha:.4g} forget_acc {a0:.4f} -> {chosen.forget_acc:.4f} "
              f"(threshold {threshold:.4f}, reached={reached}); {len(evaluated)} candidates in {rounds} rounds, "
              f"{wall:.1f} s; sweep folder {sweep_dir}", flush=True)
        return returns

    def _rounds(self, cfg: DictConfig, arguments: list[str], parent: Any, prep: dict[str, Any],
                returns: list[Sequence[JobReturn]]) -> tuple[list[Any], Any, int, int]:
        """Launch the candidate rounds until one holds a qualifying step (each round's JobReturns appended
        to ``returns``); (evaluated candidates, the chosen one or None, next job index, recomputed count).

        When the jobs run in other processes, one thread writes each round's child runs and trajectory
        metrics while the next round runs (the workers are busy then, this process idle); it is drained
        before this returns. With the basic launcher the jobs run in this process, so a writer thread would
        only contend with them for the interpreter: the rounds are written inline.
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        from potion import ptn_sweep
        from potion.unlearning.ptn_candidates import Candidate, first_qualifying

        batch_size, max_steps, threshold = self.batch_size, int(prep["schedule"]["max_steps"]), prep["threshold"]
        steps_per_job = self._steps_per_job()
        evaluated: list[Candidate] = []
        chosen: Candidate | None = None
        job_idx, recomputed = 1, 0
        writes: list[Future[None]] = []
        overlap = type(self.launcher).__name__ != "BasicLauncher"
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptn-mlflow")
        try:
            for r in range(ptn_sweep.num_rounds(batch_size, max_steps)):
                steps = ptn_sweep.round_steps(r, batch_size, max_steps)
                log.info("PTN round %d: steps %d..%d", r + 1, steps[0], steps[-1])
                jobs = ptn_sweep.job_chunks(steps, steps_per_job)
                results = self._launch([[*arguments, *ptn_sweep.job_overrides(c, ptn_sweep.CANDIDATE, parent.run_id)]
                                        for c in jobs], job_idx)
                job_idx += len(jobs)
                returns.append(results)
                values = [v for res in results for v in res.return_value]  # re-raises a failed job's error
                recomputed += sum(not v.get("importance_cache_hit") for v in values)
                cands = [ptn_sweep.candidate_of(v) for v in values]
                self._check_consistent(values, prep)
                if overlap:
                    writes.append(writer.submit(self._record_round, parent, cfg, values, cands))
                else:
                    self._record_round(parent, cfg, values, cands)
                evaluated.extend(cands)
                chosen = first_qualifying(cands, threshold)
                if chosen is not None:
                    break
        finally:
            writer.shutdown(wait=True)
        for w in writes:
            w.result()  # a failed write is an error of the sweep (tracker calls themselves only warn)
        return evaluated, chosen, job_idx, recomputed

    def _final(self, cfg: DictConfig, arguments: list[str], parent: Any, step: int, job_idx: int
               ) -> tuple[Sequence[JobReturn], dict[str, Any]]:
        """Launch the final job at ``step`` into a child run created here; replay what it recorded.

        The job logs to a RecordingTracker and returns the calls, so it never imports MLflow or reaches
        the store (a compute node need not see the tracking server), and it writes its run folder whatever
        the tracking state. A reused final run that the store holds gets no new child run (the placeholder
        is deleted and the summary names the earlier run); one the store lacks is logged into it.
        """
        from potion import ptn_sweep

        method = str(cfg.method.name)
        run = parent.child(f"unlearn-{method}", tags={"potion.task": "unlearn", "potion.method": method})
        try:
            final = self._launch([[*arguments, *ptn_sweep.job_overrides(step, ptn_sweep.FINAL, parent.run_id,
                                                                        run_id=run.run_id)]], job_idx)
            summary = final[0].return_value  # re-raises the job's error
        except BaseException as exc:
            run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        record = summary.pop(ptn_sweep.TRACKING_KEY, None)
        if record is None or (summary.get("reused") and self._already_logged(parent, summary)):
            run.discard()
            return final, summary
        return final, self._store_final(cfg, parent, run, record, summary)

    @staticmethod
    def _already_logged(parent: Any, summary: dict[str, Any]) -> bool:
        """Whether the store holds a reused final run (or cannot be asked: then nothing is logged again)."""
        from potion.tracking_runs import MISSING, logged_state

        if getattr(parent, "client", None) is None or getattr(parent, "offline", False):
            return True
        return logged_state(parent.client, str(parent.experiment_id), Path(str(summary["run_dir"])), summary,
                            "unlearn") != MISSING

    def _store_final(self, cfg: DictConfig, parent: Any, run: Any, record: dict[str, Any], summary: dict[str, Any]
                     ) -> dict[str, Any]:
        """Replay the final job's calls into its child run; calls that cannot reach the store (no child run,
        or the server went away) are kept in the run folder for ``python -m potion.relog``."""
        from potion.tracking import RecordingTracker
        from potion.tracking_runs import PENDING, record_run_id, write_pending

        run_dir = Path(str(summary["run_dir"]))
        if run.run_id is not None:
            RecordingTracker.replay(record["calls"], run)
            run.finish(record["status"] or "FINISHED")
        if run.run_id is not None and not getattr(run, "failed", False):
            (run_dir / PENDING).unlink(missing_ok=True)
            if summary.get("mlflow_run_id") == run.run_id:
                return summary
            return {**record_run_id(run_dir, summary, run.run_id), "reused": summary.get("reused", False)}
        logger = cfg.get("logger") or {}
        write_pending(run_dir, tracking_uri=str(parent.tracking_uri), experiment=str(logger.get("experiment")
                      or "potion"), run_name=f"unlearn-{cfg.method.name}", parent_run_id=parent.run_id,
                      calls=record["calls"], status=record["status"])
        self._pending = run_dir
        return summary

    def _warn_tracking_lost(self, parent: Any, sweep_dir: Path) -> None:
        """After a sweep whose tracking server went away: where the results are, and how to log them later."""
        from potion.tracking_runs import replay_command

        if self._pending is None and not getattr(parent, "offline", False):
            return
        uri = parent.tracking_uri
        text = (f"warning: the MLflow tracking server {uri} went away during the sweep; its results are on disk "
                f"(sweep folder {sweep_dir}: ptn_sweep.json, ptn_trajectory.csv")
        if self._pending is not None:
            text += (f"; final run folder {self._pending}). Once the server is back, log the final run with: "
                     f"{replay_command(self._pending, uri)}")
        else:
            text += ")"
        print(text, file=sys.stderr, flush=True)

    @staticmethod
    def _record_round(parent: Any, cfg: DictConfig, values: list[dict[str, Any]], cands: list[Any]) -> None:
        """A round's child runs (written here, by one process, not by the jobs) and the parent's trajectory."""
        from potion import ptn_sweep

        for v in values:
            ptn_sweep.log_candidate(parent, cfg, v)
        for c in cands:
            parent.log_metrics({f"traj_{k}": v for k, v in asdict(c).items() if k != "step"}, step=c.step)

    @staticmethod
    def _check_consistent(values: list[dict[str, Any]], prep: dict[str, Any]) -> None:
        """Jobs must see the prepare job's a0 (and step 0) exactly; otherwise evaluation differs between them."""
        for v in values:
            if v["a0"] != prep["a0"]:
                log.warning("PTN candidate k=%d measured a0=%.6f, the prepare job %.6f: the jobs disagree "
                            "(different data, device or discovery?)", v["step"], v["a0"], prep["a0"])
            if v["step"] == 0 and v["forget_acc"] != prep["step0"]["forget_acc"]:
                log.warning("PTN candidate k=0 measured forget_acc=%.6f, the prepare job %.6f", v["forget_acc"],
                            prep["step0"]["forget_acc"])

    @staticmethod
    def _write_outputs(sweep_dir: Path, result: dict[str, Any], evaluated: list[Any], summary: dict[str, Any],
                       prep: dict[str, Any]) -> list[Path]:
        from potion.io import atomic_write_json, atomic_write_text

        rows = [asdict(c) for c in sorted(evaluated, key=lambda c: c.step)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        trajectory = atomic_write_text(sweep_dir / "ptn_trajectory.csv", buf.getvalue())
        record = {**result, "schedule": prep["schedule"], "n_f": prep["n_f"], "n_p": prep["n_p"],
                  "method": prep["method"], "final_run_dir": summary.get("run_dir"),
                  "final_mlflow_run_id": summary.get("mlflow_run_id"),
                  "final": {k: summary.get(k) for k in FINAL_METRICS}, "trajectory": rows}
        return [trajectory, atomic_write_json(sweep_dir / "ptn_sweep.json", record)]
