"""The MLflow naming scheme (tracking.naming): one experiment per study, run names that tell a grid apart, the same
param keys on every run type, settings as params and measurements as metrics, the link to the training run, and a
PTN sweep's runs (its parent's trajectory series and plot; a rerun of a finished sweep logs nothing new).

The sweep is checked over a plain launch function with made-up job values (no torch), written to a real sqlite
store; the pipelines' own runs in ``test_pipeline_runs_share_the_scheme`` (the shared tiny model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from potion.config.compose import compose_config
from potion.reporting.query import measurements as report_measurements
from potion.reporting.query import run_row
from potion.tracking import naming

# Settings the issue found logged as metrics, and bookkeeping it found logged as params.
SETTING_METRICS = ("sgd_lr", "sgd_nesterov", "ptn_threshold", "suspect_cutoff", "alpha", "lam")
NOISE_PARAMS = ("logger.tracking_uri", "logger.experiment", "force", "resume", "out_dir", "run_dir")
SHARED_KEYS = ("dataset.name", "model.name", "poison.n_p", "poison.trigger.kind", "seed")
UNLEARN_KEYS = (*SHARED_KEYS, "method.name", "discovery.share", "discovery.n_f")
PTN_KEYS = (*UNLEARN_KEYS, "method.ptn.rho")


def _train_cfg(*extra: str) -> Any:
    return compose_config("train", ["logger=none", *extra])


def _unlearn_cfg(*extra: str) -> Any:
    return compose_config("unlearn", ["train_run=x", "logger=none", *extra])


# --------------------------------------------------------------------------- experiments


def test_one_experiment_per_study_unless_logger_experiment_says_otherwise() -> None:
    assert naming.study_name(_train_cfg()) == "digits-small_cnn"  # ${dataset.name}-${model.name}
    assert naming.study_name(_train_cfg("experiment=quickstart")) == "quickstart"
    logger = compose_config("unlearn", ["train_run=x"]).logger
    assert logger.experiment is None  # the default: the study
    assert naming.experiment_name(logger, "quickstart") == "quickstart"
    assert naming.experiment_name({**logger, "experiment": "mine"}, "quickstart") == "mine"
    assert naming.logger_for(logger, "quickstart")["experiment"] == "quickstart"
    assert naming.logger_for(None, "quickstart") is None
    assert naming.heal_study({"dataset": {"path": "/data/my_set.tar.gz"}}) == "heal-my_set"


# --------------------------------------------------------------------------- run names


def test_run_names_tell_a_grid_apart() -> None:
    train = _train_cfg("experiment=quickstart")
    names = [naming.unlearn_run_name(_unlearn_cfg(f"method={m}", *d, f"seed={s}"), train, 3, 16)
             for m in ("potion", "ssd", "retrain") for d in (["discovery.share=0.1"], ["discovery=single"])
             for s in (0, 1)]
    assert len(set(names)) == len(names) == 12
    assert names[0] == "potion d=10% p=5% s=0 resnet9 badnets"  # the quickstart's poison.fraction, as in its name
    assert "ssd d=1 p=5% s=1 resnet9 badnets" in names
    rho = [naming.unlearn_run_name(_unlearn_cfg(f"method.ptn.rho={r}"), train, 3, 16,
                                   naming.grid_extras([f"method.ptn.rho={r}", "discovery.share=0.1", "logger=none"]))
           for r in (0.1, 0.2)]
    assert rho == ["potion d=10% p=5% s=0 resnet9 badnets rho=0.1", "potion d=10% p=5% s=0 resnet9 badnets rho=0.2"]
    final = naming.unlearn_run_name(_unlearn_cfg("method.ptn.fixed_step=7"), train, 3, 16)
    assert final.endswith(" k=7")
    assert naming.candidate_run_name(12, names[0]).startswith("k=12 ")  # the step first: never cut off
    trains = {naming.train_run_name(_train_cfg(f"poison.count={n}", f"seed={s}")) for n in (100, 500) for s in (0, 1)}
    assert len(trains) == 4 and "train small_cnn badnets p=100 s=1" in trains
    lr = naming.train_extras(_train_cfg(), ["train.lr=0.1", "seed=0", "logger.tracking_uri=x", "method.ptn.rho=0.2",
                                            "+train.poison.count=100"])  # the last two: an unlearning job's
    assert naming.train_run_name(_train_cfg(), lr) == "train small_cnn badnets p=1% s=0 lr=0.1"
    assert naming.grid_extras(["+train.poison.count=100", "+train.lr=0.1"]) == []  # an unlearning run's training


def test_the_poison_size_reads_the_same_in_training_and_unlearning_run_names() -> None:
    """The issue: ``p=5%`` in the training run's name, ``p=72`` in its unlearning runs'."""
    for poison in (["experiment=quickstart"], ["poison.count=72"]):
        train = _train_cfg(*poison)
        label = re.search(r" (p=\S+) ", naming.train_run_name(train)).group(1)
        assert f" {label} " in naming.unlearn_run_name(_unlearn_cfg(), train, 7, 72)
    assert " p=72 " in naming.unlearn_run_name(_unlearn_cfg(), {"poison": {}, "model": {"name": "m"}}, 7, 72)


# --------------------------------------------------------------------------- params and metrics


def test_synthesis_and_loop_settings_are_params_not_metrics() -> None:
    """synth_samples, synth_size (and the recovered window) and a training loop's retain_steps are settings."""
    values = {"synth_samples": 140, "synth_size": 3, "synth_row": 13, "synth_col": 13, "synth_additive": 0.0,
              "synth_flip_rate": 0.9, "retain_steps": 200, "iterations": 200, "ptn_steps": 12, "clean_acc": 0.9}
    metrics = naming.measurements(values, {"name": "retrain", "iterations": 200})
    assert metrics == {"synth_flip_rate": 0.9, "ptn_steps": 12.0, "clean_acc": 0.9}
    assert naming.resolved_settings(values) == {
        "method.synthesis.samples_used": 140, "method.synthesis.window_size": 3, "method.synthesis.window_row": 13,
        "method.synthesis.window_col": 13, "method.synthesis.additive_used": 0.0, "method.sgd.retain_steps": 200}


def test_resolved_loss_and_criterion_are_params_never_auto() -> None:
    """method.loss / method.ptn.criterion: the value the method resolved, logged once (not ``auto``, not a tag)."""
    from potion.tracking.tracker import flatten_params

    train = _train_cfg("experiment=quickstart")
    params = flatten_params(naming.unlearn_params(_unlearn_cfg(), train, 3, 16))
    assert "method.loss" not in params and "method.ptn.criterion" not in params  # auto: logged once resolved
    assert params["method.ptn.rho"] == "0.1"
    given = flatten_params(naming.unlearn_params(_unlearn_cfg("method.loss=ce", "method.ptn.criterion=all"), train,
                                                 3, 16))
    assert given["method.loss"] == "ce" and given["method.ptn.criterion"] == "all"
    resolved = naming.resolved_settings({"importance_loss": "logit_norm", "ptn_criterion": "exclude_natural_target",
                                         "ptn_threshold": 0.1})
    assert resolved == {"method.loss": "logit_norm", "method.ptn.criterion": "exclude_natural_target",
                        "method.ptn.threshold": 0.1}
    heal = flatten_params(naming.heal_params(compose_config("heal", ["checkpoint=c", "discovered=d"]), 3, 0))
    assert "method.loss" not in heal and "method.ptn.criterion" not in heal
    cfg = _unlearn_cfg()
    assert cfg.method.loss == "auto"  # the caller's config is left as it was




def test_settings_are_params_and_measurements_metrics() -> None:
    values = {"clean_acc": 0.9, "healed": 91.0, "acc_drop": 1.2, "ptn_reached": True, "sgd_lr": 0.01,
              "sgd_nesterov": 1.0, "ptn_threshold": 0.05, "suspect_cutoff": 0.3, "alpha": 10.0, "lam": 1.0,
              "ptn_note": "text"}
    metrics = naming.measurements(values, {"name": "ssd", "alpha": 10.0, "lam": 1.0})
    assert metrics == {"clean_acc": 0.9, "healed": 91.0, "acc_drop": 1.2, "ptn_reached": 1.0}
    assert naming.resolved_settings(values) == {"method.sgd.lr": 0.01, "method.sgd.nesterov": 1.0,
                                                "method.ptn.threshold": 0.05, "suspects.cutoff": 0.3}
    heal = naming.heal_measurements({"clean_acc_after": 0.8, "clean_acc_before": 0.9,
                                     "discovered_given_label_after": 0.1})
    assert heal == {"clean_acc": 0.8, "clean_acc_before": 0.9, "forget_acc": 0.1}  # unlearn's names


def test_train_and_unlearn_params_share_keys_and_carry_no_bookkeeping() -> None:
    from potion.tracking.tracker import flatten_params

    train = _train_cfg("experiment=quickstart")
    train_keys = set(flatten_params(naming.train_params(train, 16)))
    assert {"train.lr", "train.epochs", "trainer.precision"} <= train_keys  # the recipe stays
    unlearn = flatten_params(naming.unlearn_params(_unlearn_cfg(), train, 3, 16))
    assert set(SHARED_KEYS) <= train_keys and set(PTN_KEYS) <= set(unlearn)
    assert not [k for k in (*train_keys, *unlearn) if k.startswith(NOISE_PARAMS) or k == "name"]
    assert {"trainer.accelerator", "suspects.enabled", "suspects.target_only"} <= set(unlearn)
    assert unlearn["poison.n_p"] == "16" and unlearn["discovery.n_f"] == "3"


def test_how_a_run_is_shown_or_logged_leaves_its_identity_and_what_it_computes_changes_it() -> None:
    from potion.config.compose import identity_hash

    base = _train_cfg("experiment=quickstart")
    shown = _train_cfg("experiment=quickstart", "trainer.progress_bar=true", "logger.experiment=elsewhere",
                       "force=true")
    assert identity_hash(shown) == identity_hash(base)  # display and bookkeeping: the same run folder
    assert identity_hash(_train_cfg("experiment=quickstart", "train.epochs=3")) != identity_hash(base)


def test_a_setting_marked_run_only_in_the_schema_leaves_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema's metadata is the one list: no key is special-cased where the hash is taken."""
    import dataclasses

    from potion.config import compose, schema

    assert ("trainer", "progress_bar") in compose.RUN_ONLY_PATHS and ("logger",) in compose.RUN_ONLY_PATHS
    cfg = _train_cfg("experiment=quickstart")
    changed = _train_cfg("experiment=quickstart", "trainer.deterministic=false")
    assert compose.identity_hash(changed) != compose.identity_hash(cfg)
    deterministic = next(f for f in dataclasses.fields(schema.Trainer) if f.name == "deterministic")
    monkeypatch.setattr(deterministic, "metadata", {"identity": False})
    monkeypatch.setattr(compose, "RUN_ONLY_PATHS", tuple(
        {*compose.RUN_ONLY_PATHS, *(p for r in schema.ROOTS.values() for p in compose._run_only_paths(r))}))
    assert ("trainer", "deterministic") in compose.RUN_ONLY_PATHS
    assert compose.identity_hash(changed) == compose.identity_hash(cfg)


def test_the_report_counts_an_old_and_a_new_run_of_one_measurement_once() -> None:
    """A standalone run logged under the old names and a sweep's final run under the new ones: n=1."""
    common = {"method.name": "potion", "method.ptn.rho": "0.1", "discovery.share": "0.1", "discovery.count": "None",
              "poison.count": "100", "poison.trigger.kind": "patch", "model.name": "resnet9", "seed": "0"}
    tags = {"potion.task": "unlearn", "potion.method": "potion", "potion.train_config_hash": "t"}
    old = {"tags": {**tags, "potion.config_hash": "a"}, "metrics": {"healed": 90.0, "acc_drop": 1.0},
           "params": {**common, "n_f": "10", "n_p": "100", "dataset": "cifar10", "train_run": "/runs/t"}}
    new = {"tags": {**tags, "potion.config_hash": "b"}, "metrics": {"healed": 91.0, "acc_drop": 1.0},
           "params": {**common, "discovery.n_f": "10", "poison.n_p": "100", "dataset.name": "cifar10",
                      "dataset.path": "/data", "method.ptn.fixed_step": "7", "method.ptn.threshold": "0.09",
                      "trainer.accelerator": "cpu"}}
    runs = [SimpleNamespace(info=SimpleNamespace(run_id=f"r{i}", start_time=i), data=SimpleNamespace(**x))
            for i, x in enumerate((old, new))]
    rows = [run_row(r) for r in reversed(runs)]
    assert rows[0]["method_params"] == rows[1]["method_params"]  # no column per resolved threshold
    kept, left_out = report_measurements(rows)
    assert [r["run_id"] for r in kept] == ["r1"] and left_out == 1


# --------------------------------------------------------------------------- a PTN sweep's runs


A0, THRESHOLD = 0.9, 0.09
TRAIN_RUN_ID = "0123456789abcdef"


class FakeJobs:
    """A launcher over made-up job values: forget_acc falls by 0.1 a step, so k=9 is the first qualifying step;
    the prepare job names a training run, the final job returns recorded tracking calls as unlearn.py's would."""

    def __init__(self, final_dir: Path) -> None:
        self.final_dir = final_dir
        self.launches: list[list[list[str]]] = []

    def __call__(self, jobs: list[list[str]]) -> list[Any]:
        self.launches.append(jobs)
        return [SimpleNamespace(return_value=self.value(job)) for job in jobs]

    def value(self, job: list[str]) -> Any:
        from potion.sweep.protocol import TRACKING_KEY, TRAIN_INFO

        opts = dict(o.lstrip("+").split("=", 1) for o in job)
        role = opts["ptn_job.role"]
        if role == "final":
            self.final_dir.mkdir(parents=True, exist_ok=True)
            summary = {"run_dir": str(self.final_dir), "mlflow_run_id": None, "clean_acc": 0.8, "healed": 95.0,
                       "config_hash": "f"}
            (self.final_dir / "summary.json").write_text(json.dumps(summary))
            calls = [("params", {"method.name": "potion"}), ("metrics", ({"healed": 95.0, "clean_acc": 0.8}, None))]
            return {**summary, TRACKING_KEY: {"calls": calls, "status": "FINISHED"}}
        steps = [0] if role == "prepare" else [int(k) for k in re.findall(r"\d+", opts["ptn_job.steps"])]
        rows = [{"step": k, "s": 0.01 * 1.5 ** k, "percentile": 50.0, "alpha": 1.0, "dampened_share": 0.01 * k,
                 "forget_acc": max(0.0, round(A0 - 0.1 * k, 10)), "a0": A0, "threshold": THRESHOLD,
                 "importance_cache_hit": float(role != "prepare"), "importance_seconds": 0.0} for k in steps]
        if role == "prepare":
            train_cfg = {"name": "quickstart", "dataset": {"name": "digits"}, "model": {"name": "resnet9"},
                         "poison": {"count": 20, "trigger": {"kind": "patch"}}}
            return {**rows[0], "n_f": 5, "n_p": 20, "prepare_seconds": 0.1,
                    TRAIN_INFO: {"cfg": train_cfg, "run_dir": "/runs/train/q", "mlflow_run_id": TRAIN_RUN_ID,
                                 "config_hash": "trainhash"}}
        return rows


def _sweep(tmp_path: Path, uri: str, sweep: str) -> tuple[dict[str, Any], FakeJobs]:
    from potion.sweep.driver import SweepSettings, run_sweep
    from potion.sweep.protocol import check_sizes

    cfg = compose_config("unlearn", ["train_run=x", "method=potion", f"logger.tracking_uri={uri}",
                                     "method.ptn.max_steps=30", f"out_dir={tmp_path / 'final'}"])
    jobs = FakeJobs(tmp_path / "final")
    run_sweep(cfg, ["method=potion"], jobs, SweepSettings(4, check_sizes(4, None), "FakeJobs", {}), tmp_path / sweep)
    return json.loads((tmp_path / sweep / "ptn_sweep.json").read_text()), jobs


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("named_sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    record, _ = _sweep(tmp, uri, "sweep")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("quickstart")  # the training run's study
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {"tmp": tmp, "uri": uri, "record": record, "client": client, "exp": exp, "runs": runs}


def _by_task(runs: list[Any], task: str) -> list[Any]:
    return [r for r in runs if r.data.tags.get("potion.task") == task]


@pytest.mark.slow  # a sqlite store of 14 runs: ~20 s on busy cores
def test_a_sweeps_runs_carry_the_scheme_and_the_training_run(swept: dict[str, Any]) -> None:
    runs = swept["runs"]
    parent, = _by_task(runs, "ptn_sweep")
    candidates, finals = _by_task(runs, "ptn_candidate"), _by_task(runs, "unlearn")
    assert len(candidates) == 12 and len(finals) == 1 and len(runs) == 14
    for run in runs:  # every run: linked to the training run, grouped by study and sweep
        tags = run.data.tags
        assert tags["potion.train_run_id"] == TRAIN_RUN_ID and tags["potion.study"] == "quickstart"
        assert tags["potion.sweep_id"] == parent.info.run_id
        assert not set(SETTING_METRICS) & set(run.data.metrics), run.info.run_name
    for run in (parent, *candidates):
        assert set(PTN_KEYS) <= set(run.data.params), run.info.run_name
        assert run.data.params["method.ptn.threshold"] == str(THRESHOLD)
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names)
    assert parent.info.run_name == "ptn-sweep potion d=10% p=20 s=0 resnet9 badnets"
    assert finals[0].info.run_name == "potion d=10% p=20 s=0 resnet9 badnets k=9"
    assert sorted(r.info.run_name.split()[0] for r in candidates) == sorted(f"k={k}" for k in range(12))
    assert {"healed", "clean_acc", "ptn_chosen_step", "ptn_a0"} <= set(parent.data.metrics)
    k3 = next(r for r in candidates if r.info.run_name.startswith("k=3 "))
    assert k3.data.params["method.ptn.fixed_step"] == "3" and k3.data.metrics["ptn_forget_acc"] == pytest.approx(0.6)


@pytest.mark.slow  # a sqlite store of 14 runs: ~20 s on busy cores
def test_the_parent_and_the_final_run_get_the_whole_trajectory(swept: dict[str, Any]) -> None:
    client, runs = swept["client"], swept["runs"]
    parent, = _by_task(runs, "ptn_sweep")
    final, = _by_task(runs, "unlearn")
    for run in (parent, final):
        history = client.get_metric_history(run.info.run_id, "ptn_traj_forget_acc")
        assert sorted(m.step for m in history) == list(range(12)), run.info.run_name
        assert "ptn_trajectory.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not [k for r in runs for k in r.data.metrics if k.startswith("traj_")]  # one trajectory name


@pytest.mark.slow  # a sqlite store of 14 runs: ~20 s on busy cores
def test_a_rerun_of_a_finished_sweep_logs_nothing_new(swept: dict[str, Any]) -> None:
    before = {r.info.run_id for r in swept["runs"]}
    again, jobs = _sweep(swept["tmp"], swept["uri"], "sweep_again")
    after = {r.info.run_id for r in swept["client"].search_runs([swept["exp"].experiment_id], max_results=1000)}
    assert after == before  # no parent, candidate or final run added
    assert len(jobs.launches) == 1  # only the prepare job, which names the training run
    parent, = _by_task(swept["runs"], "ptn_sweep")
    assert again["reused_parent_run_id"] == parent.info.run_id
    assert again["ptn_chosen_step"] == swept["record"]["ptn_chosen_step"] == 9


# --------------------------------------------------------------------------- the pipelines' own runs


@pytest.mark.slow  # pipeline runs on the shared tiny model
def test_pipeline_runs_share_the_scheme(tiny: Any, tmp_path: Path) -> None:
    """train.py's run (the session's tiny model) and unlearn.py's runs in its study's experiment: the same keys,
    no settings as metrics, no bookkeeping params, the trainer and suspects settings, the training run's id."""
    from mlflow import MlflowClient

    from potion.pipelines.unlearn import run_unlearning

    common = [f"train_run={tiny.run}", f"logger.tracking_uri={tiny.uri}", "save_weights=false"]
    ids = [run_unlearning(compose_config("unlearn", [*common, *extra, f"out_dir={tmp_path / name}"]))["mlflow_run_id"]
           for name, extra in (("potion", ["method=potion", "discovery.share=0.5"]),
                               ("finetune", ["method=finetune", "method.iterations=5", "method.k=1",
                                             "discovery=single"]))]
    client = MlflowClient(tiny.uri)
    train = client.get_run(tiny.summary["mlflow_run_id"])
    runs = [client.get_run(i) for i in ids]
    assert client.get_experiment(train.info.experiment_id).name == "imagefolder-small_cnn"  # the study
    assert {r.info.experiment_id for r in runs} == {train.info.experiment_id}
    assert set(SHARED_KEYS) <= set(train.data.params)
    assert not [k for k in train.data.params if k.startswith(NOISE_PARAMS) or k == "name"]
    assert train.data.tags["potion.study"] == "imagefolder-small_cnn"
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        assert set(UNLEARN_KEYS) <= set(params) and {"trainer.accelerator", "suspects.signature"} <= set(params)
        assert params["poison.n_p"] == train.data.params["poison.n_p"] == "16"
        assert not set(SETTING_METRICS) & set(metrics) and "suspects.cutoff" in params
        assert {"healed", "acc_drop", "clean_acc", "asr"} <= set(metrics)
        assert not [k for k in params if k.startswith(NOISE_PARAMS)]
        assert run.data.tags["potion.train_run_id"] == train.info.run_id
    potion_run, finetune_run = runs
    assert potion_run.info.run_name == "potion d=50% p=16 s=0 small_cnn badnets"
    assert finetune_run.info.run_name == "finetune d=1 p=16 s=0 small_cnn badnets"
    assert set(PTN_KEYS) <= set(potion_run.data.params) and "method.ptn.threshold" in potion_run.data.params
    assert float(finetune_run.data.params["method.sgd.lr"]) > 0 and "method.sgd.nesterov" in finetune_run.data.params


def test_a_multirun_job_is_grouped_and_named_by_its_overrides(tmp_path: Path) -> None:
    """Inside a job of ``unlearn.py -m``: the multirun folder is the grid tag, and the job's overrides name it;
    a PTN sweeper's job gets no grid (its sweep groups it) and loses the sweeper's own overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    def job(*overrides: str) -> tuple[str | None, list[str]]:
        conf = Path(__file__).resolve().parents[1] / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("unlearn", list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "multirun")
        HydraConfig.instance().set_config(cfg)
        try:
            return naming.hydra_job()
        finally:
            HydraConfig.instance().cfg = None

    grid, overrides = job("train_run=x", "method.ptn.rho=0.2", "discovery.share=0.1")
    assert naming.grid_tags(grid) == {"potion.grid": str(tmp_path / "multirun")}
    assert naming.grid_extras(overrides) == ["rho=0.2"]
    grid, overrides = job("train_run=x", "method.ptn.fixed_step=3", "++ptn_job.role=final")
    assert grid is None and overrides == ["train_run=x", "method.ptn.fixed_step=3"]
    assert naming.hydra_job() == (None, [])  # outside Hydra


@pytest.mark.slow  # a heal of the session's practitioner model
def test_a_heal_run_reads_as_an_unlearning_run(own_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from tiny_world import OWN_N_FOUND as N_FOUND
    from tiny_world import heal_overrides

    from potion.pipelines.heal import heal

    monkeypatch.setenv("POTION_CACHE_DIR", str(own_model.cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trigger = "trigger={kind: patch, size: 3, color: [1.0]}"
    summary = heal(compose_config("heal", [*heal_overrides(own_model, f"out_dir={tmp_path / 'out'}"), "logger=mlflow",
                                           f"logger.tracking_uri={uri}", trigger]))
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "heal-data"  # the data folder's name
    assert run.info.run_name == f"heal potion d={N_FOUND} small_cnn"
    assert run.data.tags["potion.task"] == "heal" and run.data.tags["potion.study"] == "heal-data"
    metrics, params = run.data.metrics, run.data.params
    assert {"clean_acc", "clean_acc_before", "acc_drop", "asr", "healed", "forget_acc"} <= set(metrics)
    assert not [k for k in metrics if k.endswith("_after")] and not set(SETTING_METRICS) & set(metrics)
    assert params["discovery.n_f"] == str(N_FOUND) and params["poison.target"] == "0"
    assert {"dataset.path", "model.name", "method.name", "method.ptn.rho", "method.ptn.threshold",
            "suspects.cutoff"} <= set(params)
