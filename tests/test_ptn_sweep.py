"""PTN as a Hydra sweeper (sweep.py, hydra_plugins/potion_ptn): the in-process answer, importances computed
once, MLflow parent/child runs, and the same answer through the joblib and submitit (local) launchers.

The session's shared tiny model is swept (a link to its run folder, read only). The PTN grid is compressed
(s_start=0.01, s_step=1.5) so the search needs a handful of steps, and the sweeper's batch size is picked from the
in-process answer so that the sweep takes several rounds. Trigger synthesis is off and the stopping test watches
every discovered sample: what is checked here is how the sweep splits one search, and synthesis would repeat its
window search in every job.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny_world import QUICK_PTN

from potion.config.compose import compose_config
from potion.core.errors import ConfigError
from potion.sweep.protocol import (
    CANDIDATE,
    FINAL,
    PREPARE,
    check_ptn_config,
    job_chunks,
    job_overrides,
    num_rounds,
    round_steps,
)

ROOT = Path(__file__).resolve().parent.parent
PTN = QUICK_PTN


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_run: Any) -> Path:
    tmp = tmp_path_factory.mktemp("ptn_sweep")
    (tmp / "train").symlink_to(tiny_run.run, target_is_directory=True)
    (tmp / "mlflow.db").symlink_to(Path(tiny_run.uri.removeprefix("sqlite:///")))  # the training run's store
    return tmp


@pytest.fixture(scope="module")
def inproc(work: Path) -> dict[str, Any]:
    """The in-process search (python unlearn.py ... method=potion) and its trajectory."""
    from potion.pipelines.unlearn import run_unlearning

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(work / "cache_inproc"))
        mp.setenv("POTION_THREADS", "1")
        s = run_unlearning(compose_config("unlearn", [f"train_run={work / 'train'}", *PTN, "logger=none",
                                                      f"out_dir={work / 'inproc'}", "save_weights=false"]))
    with open(work / "inproc" / "ptn_trajectory.csv") as fh:
        s["trajectory"] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    s["chosen"] = int(s["ptn_steps"]) - 1
    if s["chosen"] < 2:
        pytest.fail(f"the in-process search stopped at k={s['chosen']}: lower method.ptn.s_start so it needs "
                    "several steps, or this test checks nothing about rounds")
    s["batch"] = (s["chosen"] + 2) // 2  # two rounds, the second one holding the answer
    return s


def _sweep(work: Path, name: str, batch: int, *extra: str, sweep: str | None = None) -> dict[str, Any]:
    env = {**os.environ, "POTION_CACHE_DIR": str(work / f"cache_{name}"), "POTION_THREADS": "1"}
    sweep_dir = work / f"sweep_{sweep or name}"
    cmd = [sys.executable, "sweep.py", f"train_run={work / 'train'}", *PTN,
           f"logger.tracking_uri=sqlite:///{(work / 'mlflow.db').resolve()}", f"logger.experiment={name}",
           f"hydra.sweeper.batch_size={batch}", f"hydra.sweep.dir={sweep_dir}",
           f"out_dir={work / ('final_' + name)}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sweep.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    record = json.loads((sweep_dir / "ptn_sweep.json").read_text())
    record["final_summary"] = json.loads((work / f"final_{name}" / "summary.json").read_text())
    record["stdout"], record["console"] = proc.stdout, proc.stdout + proc.stderr
    return record


def _assert_plain_console(record: dict[str, Any], batch: int) -> None:
    """A line per round and the final job's result; none of Hydra's, joblib's or the jobs' internals."""
    out, console = record["stdout"], record["console"]
    assert "PTN sweep: importances" in out and "PTN round 1 of at most " in out and f"(steps 0..{batch - 1}): " in out
    assert "run folder: " in out and "PTN sweep (" in out  # the final job's result, the summary
    for internal in ("++ptn_job", "ptn_job.role", "Launching", "Joblib.Parallel", "backend=", "#0 :",
                     "ptn candidate k="):
        assert internal not in console, (internal, console[-3000:])


@pytest.fixture(scope="module")
def basic(work: Path, inproc: dict[str, Any]) -> dict[str, Any]:
    return _sweep(work, "basic", inproc["batch"])


@pytest.fixture(scope="module")
def client(work: Path, basic: dict[str, Any]) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(work / 'mlflow.db').resolve()}")


def _runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=1000)


# ------------------------------------------------------------------------------------------- helpers


def test_rounds_cover_the_grid_in_order() -> None:
    assert [round_steps(r, 4, 10) for r in range(num_rounds(4, 10))] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert num_rounds(8, 500) == 63 and num_rounds(1, 3) == 3


def test_job_overrides_quote_the_parent_id_and_name_the_role() -> None:
    assert job_overrides(3, CANDIDATE, "1234e5") == ["++ptn_job.steps=[3]", "++ptn_job.role=candidate",
                                                     "++ptn_job.parent_run_id='1234e5'"]
    assert job_overrides([4, 5, 6], CANDIDATE, None) == ["++ptn_job.steps=[4,5,6]", "++ptn_job.role=candidate"]
    assert job_overrides(2, FINAL, "p", run_id="r") == ["method.ptn.fixed_step=2", "++ptn_job.role=final",
                                                        "++ptn_job.parent_run_id='p'", "++ptn_job.run_id='r'"]
    assert job_overrides(0, FINAL, None) == ["method.ptn.fixed_step=0", "++ptn_job.role=final"]
    assert job_overrides(None, PREPARE, "7") == ["++ptn_job.role=prepare", "++ptn_job.parent_run_id='7'"]
    with pytest.raises(ValueError, match="takes no step"):
        job_overrides(0, PREPARE, None)
    with pytest.raises(ValueError, match="needs a step"):
        job_overrides(None, CANDIDATE, None)


def test_a_round_splits_into_jobs_of_consecutive_steps() -> None:
    assert job_chunks([8, 9, 10, 11, 12], 2) == [[8, 9], [10, 11], [12]]
    assert job_chunks([0, 1, 2], 8) == [[0, 1, 2]] and job_chunks([0, 1], 1) == [[0], [1]]
    with pytest.raises(ValueError, match="steps_per_job"):
        job_chunks([0], 0)


def test_only_single_search_methods_are_swept() -> None:
    for method in ("potion_iterative", "ssd"):
        cfg = compose_config("unlearn", ["train_run=x", f"method={method}", "logger=none"])
        with pytest.raises(ConfigError, match=f"method={method}: the ptn sweeper runs"):
            check_ptn_config(cfg)


def test_the_sweeper_process_never_imports_torch() -> None:
    """What the sweeper itself runs is torch-free: it can sit on a login node while the jobs do the tensor work."""
    code = ("import sys, potion.sweep.driver, potion.tracking.tracker, potion.cli, "
            "hydra_plugins.potion_ptn.ptn_sweeper; "
            "assert 'torch' not in sys.modules, 'the sweeper imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.slow  # a subprocess that imports torch
def test_unlearning_and_its_jobs_start_without_lightning() -> None:
    """Lightning (with the torchmetrics and torchvision models it pulls in: ~3 s of CPU) is loaded to fit a model
    only: every unlearn.py run, heal and PTN job starts without it."""
    code = ("import sys, potion.sweep.jobs, potion.pipelines.heal; "
            "assert 'pytorch_lightning' not in sys.modules, 'unlearning imported Lightning'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_sweep_py_selects_the_ptn_sweeper_once() -> None:
    from sweep import ptn_argv

    assert ptn_argv(["a=1"]) == ["--multirun", "hydra/sweeper=ptn", "a=1"]
    assert ptn_argv(["-m", "hydra/sweeper=basic", "a=1"]) == ["-m", "hydra/sweeper=basic", "a=1"]


def test_the_sweeper_is_registered_with_hydra() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("unlearn", ["hydra/sweeper=ptn", "hydra.sweeper.batch_size=3"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.potion_ptn.ptn_sweeper.PTNSweeper"
    assert cfg.hydra.sweeper.batch_size == 3


def test_an_unknown_job_role_is_a_config_error() -> None:
    from potion.sweep.jobs import dispatch

    cfg = compose_config("unlearn", ["train_run=x", "++ptn_job.role=bogus", "logger=none"])
    with pytest.raises(ConfigError, match="ptn_job.role=bogus"):
        dispatch(cfg)


def test_a_sweep_override_is_refused_in_one_line(tmp_path: Path, cache: Path) -> None:
    proc = subprocess.run([sys.executable, "sweep.py", "train_run=x", "logger=none", "method.ptn.rho=0.1,0.2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: method.ptn.rho: the ptn sweeper runs one")


# ------------------------------------------------------------------------------------------- the sweep


@pytest.mark.slow  # a trained model and a sweep
def test_the_sweep_chooses_the_in_process_step(basic: dict[str, Any], inproc: dict[str, Any]) -> None:
    assert basic["ptn_chosen_step"] == inproc["chosen"]
    assert basic["ptn_reached"] == bool(inproc["ptn_reached"])
    assert basic["ptn_rounds"] >= 2 and basic["ptn_steps_evaluated"] == basic["ptn_rounds"] * inproc["batch"]
    seen = {int(r["step"]): r["forget_acc"] for r in basic["trajectory"]}
    measured = [r for r in inproc["trajectory"] if not math.isnan(float(r["forget_acc"]))]
    assert int(measured[-1]["step"]) == inproc["chosen"]  # the decisive scan measures the step it stops on in full
    for row in measured:  # every step the in-process search measured in full, identically
        assert seen[int(row["step"])] == pytest.approx(row["forget_acc"], abs=1e-12)
    final = basic["final_summary"]  # the final job healed the same model as the in-process search
    assert final["ptn_steps"] == inproc["ptn_steps"] and final["ptn_alpha"] == pytest.approx(inproc["ptn_alpha"])
    for key in ("clean_acc", "asr", "forget_acc", "poisoned_train_acc"):
        assert final[key] == pytest.approx(inproc[key], abs=1e-9), key
    assert f"k={inproc['chosen']}" in basic["stdout"]
    _assert_plain_console(basic, inproc["batch"])


@pytest.mark.slow  # a trained model and a sweep
def test_jobs_read_the_importances_the_prepare_job_computed(work: Path, basic: dict[str, Any], client: Any) -> None:
    assert len(list((work / "cache_basic" / "importance").glob("*.safetensors"))) == 2  # Omega_r, Omega_f once
    assert basic["ptn_jobs_recomputed_importance"] == 0
    runs = _runs(client, "basic")
    parent = next(r for r in runs if r.data.tags.get("potion.task") == "ptn_sweep")
    assert parent.data.metrics["prepare_importance_cache_hit"] == 0  # computed by the prepare job, before the rest
    overrides = (work / "sweep_basic" / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "ptn_job.role=prepare" in overrides and "fixed_step" not in overrides  # the sweep's first job
    jobs = sorted(int(d.name) for d in (work / "sweep_basic").iterdir() if d.name.isdigit())
    assert jobs == list(range(basic["ptn_rounds"] + 2))  # basic launcher, steps_per_job auto: a round is one job
    jobs = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert jobs and all(r.data.metrics["importance_cache_hit"] == 1 for r in jobs)


@pytest.mark.slow  # a trained model and a sweep
def test_mlflow_links_every_job_to_the_parent(basic: dict[str, Any], client: Any, inproc: dict[str, Any]) -> None:
    from potion.tracking.tracker import PARENT_TAG

    runs = _runs(client, "basic")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["potion.task"] == "ptn_sweep"
    children = [r for r in runs if r.info.run_id != pid]
    assert all(r.data.tags[PARENT_TAG] == pid for r in children)
    candidates = [r for r in children if r.data.tags.get("potion.task") == "ptn_candidate"]
    finals = [r for r in children if r.data.tags.get("potion.task") == "unlearn"]
    assert len(candidates) == basic["ptn_steps_evaluated"] and len(finals) == 1
    assert sorted(int(r.data.params["method.ptn.fixed_step"]) for r in candidates) == list(
        range(basic["ptn_steps_evaluated"]))
    assert finals[0].info.run_id == parent.data.tags["potion.final_run_id"] == basic["final_summary"]["mlflow_run_id"]
    m = parent.data.metrics
    assert m["ptn_chosen_step"] == inproc["chosen"] and m["ptn_reached"] == float(bool(inproc["ptn_reached"]))
    assert m["ptn_rounds"] == basic["ptn_rounds"] and m["ptn_wall_seconds"] > 0
    assert {"ptn_s", "ptn_alpha", "ptn_percentile", "ptn_steps_evaluated"} <= set(m)
    assert parent.data.params["method.ptn.s_start"] == "0.01"
    assert parent.data.params["sweeper.batch_size"] == str(inproc["batch"])


@pytest.mark.slow  # a trained model and a sweep
def test_the_parent_and_final_runs_have_inputs_config_log_and_the_final_model(basic: dict[str, Any], client: Any,
                                                                             tiny_run: Any) -> None:
    """The sweep logs to the training run's store: both runs name its logged model as their input."""
    from potion.tracking.tracker import PARENT_TAG

    runs = _runs(client, "basic")
    (parent,) = [client.get_run(r.info.run_id) for r in runs if PARENT_TAG not in r.data.tags]  # get_run: inputs
    final = client.get_run(basic["final_summary"]["mlflow_run_id"])
    (train_model,) = client.get_run(tiny_run.summary["mlflow_run_id"]).outputs.model_outputs
    for run in (parent, final):
        assert len(run.inputs.dataset_inputs) == 1
        assert [m.model_id for m in run.inputs.model_inputs] == [train_model.model_id]
        assert {"config.yaml", "run.log"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.data.tags.get("mlflow.source.git.commit") == _git_head()
    assert "model.safetensors" in {a.path for a in client.list_artifacts(final.info.run_id)}
    assert len(final.outputs.model_outputs) == 1
    page = f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{{}}?workflowType=machine_learning"
    assert f"MLflow final run: {page.format(final.info.run_id)}" in basic["stdout"]
    assert f"MLflow sweep parent run: {page.format(parent.info.run_id)}" in basic["stdout"]
    assert basic["stdout"].count("MLflow runs table:") == 1


def _git_head() -> str | None:
    """The checkout's commit, as MLflow tags a run started from it (None outside a git checkout)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow  # a trained model and a sweep
def test_the_joblib_launcher_gives_the_same_step(work: Path, inproc: dict[str, Any], basic: dict[str, Any],
                                                 client: Any) -> None:
    from potion.tracking.tracker import PARENT_TAG

    half = max(1, inproc["batch"] // 2)  # a round in two parallel jobs
    rec = _sweep(work, "joblib", inproc["batch"], "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 f"hydra.sweeper.steps_per_job={half}")
    assert rec["ptn_chosen_step"] == inproc["chosen"] == basic["ptn_chosen_step"]
    assert rec["trajectory"] == basic["trajectory"]  # half a round per job or a whole round per job: the same values
    assert "JoblibLauncher" in rec["stdout"]
    _assert_plain_console(rec, inproc["batch"])
    runs = _runs(client, "joblib")  # the shared sqlite store took the parallel jobs' runs intact
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    assert len(runs) == rec["ptn_steps_evaluated"] + 2
    assert all(r.data.tags.get(PARENT_TAG) == parent.info.run_id for r in runs if r is not parent)
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow  # a trained model and a sweep
def test_a_rerun_of_a_finished_sweep_logs_nothing_new(work: Path, inproc: dict[str, Any], basic: dict[str, Any],
                                                      client: Any) -> None:
    before = {r.info.run_id for r in _runs(client, "basic")}
    again = _sweep(work, "basic", inproc["batch"], sweep="basic_again")  # same config, same out_dir: reused
    assert again["ptn_chosen_step"] == basic["ptn_chosen_step"]
    assert again["final_mlflow_run_id"] == basic["final_mlflow_run_id"]  # the earlier final run, not a new one
    assert {r.info.run_id for r in _runs(client, "basic")} == before  # no parent, candidate or final run added
    parent = next(r for r in _runs(client, "basic") if r.data.tags.get("potion.task") == "ptn_sweep")
    assert again["reused_parent_run_id"] == parent.info.run_id and "already finished" in again["stdout"]
    jobs = sorted(int(d.name) for d in (work / "sweep_basic_again").iterdir() if d.name.isdigit())
    assert jobs == [0]  # the prepare job only


@pytest.mark.slow  # a trained model and a sweep
def test_the_submitit_launcher_runs_the_cluster_path(work: Path, inproc: dict[str, Any], basic: dict[str, Any],
                                                     client: Any) -> None:
    """hydra/launcher=submitit_local: each job in a process of its own, results pickled back, as on SLURM."""
    rec = _sweep(work, "submitit", inproc["batch"], "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 f"hydra.sweeper.steps_per_job={inproc['batch']}")
    assert rec["ptn_chosen_step"] == inproc["chosen"] and rec["trajectory"] == basic["trajectory"]
    assert "LocalLauncher" in rec["stdout"]
    runs = _runs(client, "submitit")
    finals = [r for r in runs if r.data.tags.get("potion.task") == "unlearn"]
    assert [r.info.run_id for r in finals] == [rec["final_summary"]["mlflow_run_id"]]
    assert finals[0].data.metrics["healed"] == pytest.approx(rec["final_summary"]["healed"])
    assert len([r for r in runs if r.data.tags.get("potion.task") == "ptn_candidate"]) == rec["ptn_steps_evaluated"]
