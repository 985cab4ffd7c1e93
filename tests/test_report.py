"""potion.report: tables, csv and figures of unlearning runs read from a real (sqlite) MLflow store.

Tests that create a store are marked slow (creating one takes seconds); the counting, grouping, table and
figure tests work on rows and run in the fast loop.
"""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from potion.report import CSV_COLUMNS, aggregate, main, markdown_tables
from potion.reporting.aggregate import study_of, study_suffixes
from potion.reporting.query import SWEEPER_PARAMS, measurements, run_row, select

METHODS = ("potion", "ssd")
SIZES = (100, 500)
DISCOVERY = ((None, 1), (0.1, None), (0.5, None))  # (share, count): a single sample, 10 %, 50 %
SEEDS = (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TITLE = "cifar10 · resnet9 · patch trigger (BadNets)"


def healed_of(method: str, n_p: int, d: int, seed: int) -> float:
    return {"potion": 90.0, "ssd": 80.0}[method] - 5 * d + 4 * seed + (n_p == 500)


def acc_drop_of(method: str, n_p: int, d: int, seed: int) -> float:
    return {"potion": 1.0, "ssd": 5.0}[method] + d + 0.5 * seed


# --------------------------------------------------------------------------- what the pipelines log


def logged_run(*, method: str = "potion", n_p: int = 100, share: float | None = 0.1, count: int | None = None,
               seed: int = 0, healed: float = 90.0, acc_drop: float = 1.0, config_hash: str = "h",
               dataset: str = "cifar10", attack: str = "patch", mapping: str = "all_to_one", train: str = "train-hash",
               train_dir: str = "/runs/train/t", rho: str = "0.1", fixed_step: int | None = None,
               healed_attainable: float | None = None) -> dict[str, dict[str, Any]]:
    """The tags, params and metrics of one unlearning run as potion.pipelines.unlearn logs them.

    A PTN sweep's final run is the same call with ``fixed_step`` set (the sweeper pins the chosen step k,
    so its config hash differs from a standalone run of the same settings).
    """
    n_f = count if count is not None else max(1, round(share * n_p))
    tags = {"potion.task": "unlearn", "potion.method": method, "potion.config_hash": config_hash,
            "potion.train_run_id": f"mlflow-{train}", "potion.train_config_hash": train}
    params = {"method.name": method, "method.ptn.rho": rho, "method.ptn.fixed_step": str(fixed_step),
              "discovery.share": str(share), "discovery.count": str(count), "discovery.seed": str(seed),
              "poison.count": str(n_p), "poison.fraction": "None", "poison.target": "0", "poison.mapping": mapping,
              "poison.trigger.kind": attack, "poison.seed": "0", "train_run": train_dir, "n_f": str(n_f),
              "n_p": str(n_p), "seed": str(seed), "dataset": dataset, "model.name": "resnet9"}
    metrics = {"clean_acc": 0.9, "poison_acc": 0.85, "asr": 0.02, "healed": healed, "acc_drop": acc_drop,
               "forget_acc": 0.1, "poisoned_train_acc": 0.8, "unlearn_seconds": 1.5, "clean_acc_before": 0.91,
               "poison_acc_before": 0.1, "asr_before": 0.99}
    if healed_attainable is not None:
        metrics["healed_attainable"] = healed_attainable
    return {"tags": tags, "params": params, "metrics": metrics}


def fake_run(run_id: str, start: int, logged: dict[str, dict[str, Any]]) -> Any:
    """An object shaped like an MLflow Run (info + data), for tests that need no store."""
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=start), data=SimpleNamespace(**logged))


def rows_of(*logged: dict[str, dict[str, Any]]) -> list[dict]:
    """Rows of runs logged in this order (the last is the newest), newest first as the store returns them."""
    runs = [fake_run(f"r{i}", 1000 + i, x) for i, x in enumerate(logged)]
    return [r for r in map(run_row, reversed(runs)) if r is not None]


# --------------------------------------------------------------------------- real stores


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty, migrated sqlite store to copy (creating the tables takes seconds); fast, unsynced sqlite."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def fast(dbapi_conn, _record) -> None:  # test stores need no durability: skip the fsyncs
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.execute("PRAGMA journal_mode=MEMORY")
        cur.close()

    event.listen(Engine, "connect", fast)
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    yield path
    event.remove(Engine, "connect", fast)


def new_store(template: Path, folder: Path, experiment: str | None = "potion"):
    """A copy of the empty store in ``folder``: (uri, client, experiment id or None)."""
    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = None
    if experiment:  # artifacts beside the database, never in the working folder
        exp_id = client.create_experiment(experiment, artifact_location=(folder / "mlruns").as_uri())
    return uri, client, exp_id


_clock = [1_700_000_000_000]


def store_run(client, exp_id: str, logged: dict[str, dict[str, Any]], status: str | None = "FINISHED",
              parent: str | None = None, run_name: str = "unlearn") -> str:
    """Write ``logged`` (tags, params, metrics) as one run of the store; ``parent``: a child of that run."""
    from mlflow.entities import Metric, Param

    _clock[0] += 1000
    tags = dict(logged.get("tags", {}))
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, start_time=_clock[0], run_name=run_name, tags=tags)
    metrics = [Metric(k, v, _clock[0], 0) for k, v in logged.get("metrics", {}).items()]
    params = [Param(k, v) for k, v in logged.get("params", {}).items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    if status is not None:
        client.set_terminated(run.info.run_id, status, end_time=_clock[0] + 500)
    return run.info.run_id


def add_run(client, exp_id: str, status: str | None = "FINISHED", **kwargs: Any) -> str:
    return store_run(client, exp_id, logged_run(**kwargs), status)


def add_grid(client, exp_id: str, seeds=SEEDS, discovery=DISCOVERY) -> int:
    n = 0
    for method in METHODS:
        for n_p in SIZES:
            for d, (share, count) in enumerate(discovery):
                for seed in seeds:
                    add_run(client, exp_id, method=method, n_p=n_p, share=share, count=count, seed=seed,
                            healed=healed_of(method, n_p, d, seed), acc_drop=acc_drop_of(method, n_p, d, seed),
                            config_hash=f"{method}-{n_p}-{d}-{seed}")
                    n += 1
    return n


@pytest.fixture(scope="module")
def report(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The grid store (plus a stale duplicate and unfinished runs), reported once with --log-run."""
    folder = tmp_path_factory.mktemp("grid")
    uri, client, exp_id = new_store(template, folder)
    # An older run with the same config hash as (potion, 100, 10 %, seed 0) and wrong values: the later one counts.
    add_run(client, exp_id, method="potion", n_p=100, share=0.1, seed=0, healed=0.0, acc_drop=50.0,
            config_hash="potion-100-1-0")
    add_grid(client, exp_id)
    # A repeat of a finished config (same hash, same values), and runs that did not finish: all ignored.
    add_run(client, exp_id, method="potion", n_p=100, share=0.1, seed=0, healed=healed_of("potion", 100, 1, 0),
            acc_drop=acc_drop_of("potion", 100, 1, 0), config_hash="potion-100-1-0")
    add_run(client, exp_id, None, method="potion", n_p=100, share=0.1, seed=7, healed=-100.0, acc_drop=99.0,
            config_hash="running")
    add_run(client, exp_id, "FAILED", method="ssd", n_p=500, share=0.5, seed=7, healed=-100.0, acc_drop=99.0,
            config_hash="failed")
    store_run(client, exp_id, {"tags": {"potion.task": "train", "potion.cpu": "AMD EPYC (avx2 avx512f)"},
                               "params": {"poison.trigger.kind": "patch", "poison.n_p": "100", "seed": "1"},
                               "metrics": {"clean_acc": 0.7331, "asr": 0.9385, "train_seconds": 612.4}},
              run_name="train")
    out = folder / "report"
    code = main(["--tracking-uri", uri, "--experiment", "potion", "--out", str(out), "--log-run"])
    return {"code": code, "out": out, "uri": uri, "client": client, "exp_id": exp_id}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def png_size_and_dpi(data: bytes) -> tuple[int, int, float]:
    """(width, height, dots per inch) from a PNG's IHDR and pHYs chunks."""
    assert data[:8] == PNG_MAGIC
    pos, width, height, dpi = 8, 0, 0, math.nan
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"pHYs":
            per_unit, _, unit = struct.unpack(">IIB", body)
            assert unit == 1  # pixels per metre
            dpi = per_unit * 0.0254
        pos += 12 + length
    return width, height, dpi


# --------------------------------------------------------------------------- the grid report


@pytest.mark.slow
def test_markdown_table_has_cell_mean_std_and_headline(report: dict) -> None:
    assert report["code"] == 0
    md = (report["out"] / "table.md").read_text()
    assert f"## {TITLE}" in md
    assert "| poisoned images | discovered | potion | ssd |" in md
    # potion, n_p=100, 10 %: healed 85, 89 -> 87.00 ± 2.83; acc_drop 2.0, 2.5 -> 2.25 ± 0.35 (sample std)
    healed = [healed_of("potion", 100, 1, s) for s in SEEDS]
    assert (statistics.fmean(healed), round(statistics.stdev(healed), 2)) == (87.0, 2.83)
    row = next(line for line in md.splitlines() if line.startswith("| 100 | 10% |"))
    assert row.split(" | ")[2] == "87.00 ± 2.83 / 2.25 ± 0.35"
    # single-image and percentage rows, sorted by n_p then share
    labels = [line.split(" | ")[:2] for line in md.splitlines() if line.startswith(("| 100 ", "| 500 ", "| all "))]
    assert labels == [["| 100", "1 image"], ["| 100", "10%"], ["| 100", "50%"], ["| 100", "mean"],
                      ["| 500", "1 image"], ["| 500", "10%"], ["| 500", "50%"], ["| 500", "mean"], ["| all", "mean"]]
    # headline: mean over the 6 cells of each method (hand-computed: potion 87.5 / 2.25, ssd 77.5 / 6.25)
    assert "| all | mean | 87.50 / 2.25 | 77.50 / 6.25 |" in md
    assert "(n=" not in md  # every cell holds its 2 seeds: the duplicate and unfinished runs did not count
    assert "method.md" not in md and "§" not in md  # the note cites nothing outside the repository


@pytest.mark.slow
def test_the_models_behind_the_cells_are_listed_with_their_processor(report: dict) -> None:
    lines = (report["out"] / "models.md").read_text().splitlines()
    (row,) = [line for line in lines if line.startswith("| patch trigger")]
    assert row.split(" | ")[1:7] == ["1", "100", "0.733", "0.939", "612", "AMD EPYC (avx2 avx512f)"]
    assert row.split(" | ")[8] == "0"  # no cell of the report heals it (the grid's cells name no training run)
    runs = read_csv(report["out"] / "runs.csv")
    assert "cpu" in runs[0]  # and every cell says where it computed


@pytest.mark.slow
def test_csv_long_format(report: dict) -> None:
    rows = read_csv(report["out"] / "table.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    cells = [r for r in rows if r["discovery"] != "mean"]
    assert len(cells) == len(METHODS) * len(SIZES) * len(DISCOVERY)
    assert {r["n_runs"] for r in cells} == {"2"}
    assert {(r["model"], r["attack"], r["mapping"]) for r in rows} == {("resnet9", "patch", "all_to_one")}
    assert len(rows) == len(cells) + len(METHODS) * (len(SIZES) + 1)
    cell = next(r for r in cells if (r["method"], r["n_p"], r["discovery"]) == ("ssd", "500", "1 image"))
    assert float(cell["healed_mean"]) == pytest.approx(83.0)
    assert float(cell["healed_std"]) == pytest.approx(math.sqrt(8))
    assert float(cell["acc_drop_mean"]) == pytest.approx(5.25)
    assert float(cell["clean_acc_mean"]) == pytest.approx(0.9)
    assert float(cell["unlearn_seconds_mean"]) == pytest.approx(1.5)
    assert cell["healed_attainable_mean"] == ""  # not logged by these runs
    overall = next(r for r in rows if (r["method"], r["n_p"], r["discovery"]) == ("potion", "all", "mean"))
    assert (float(overall["healed_mean"]), float(overall["acc_drop_mean"])) == (87.5, 2.25)
    assert overall["healed_std"] == "" and overall["n_runs"] == "12"
    runs = read_csv(report["out"] / "runs.csv")  # one line per counted run, traceable to MLflow
    assert len(runs) == 24 and len({r["run_id"] for r in runs}) == 24


@pytest.mark.slow
def test_figures_are_300_dpi_png_and_pdf(report: dict) -> None:
    for metric in ("healed", "acc_drop"):
        width, _, dpi = png_size_and_dpi((report["out"] / f"{metric}_vs_discovery.png").read_bytes())
        assert dpi == pytest.approx(300, abs=0.5) and width >= 2000
        assert (report["out"] / f"{metric}_vs_discovery.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (report["out"] / "healed_attainable_vs_discovery.png").exists()  # no run reports it
    assert not list(report["out"].glob(".*.tmp"))


@pytest.mark.slow
def test_log_run_records_artifacts(report: dict) -> None:
    client = report["client"]
    runs = client.search_runs([report["exp_id"]], "tags.`potion.task` = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["n_runs"] == "24"
    assert runs[0].data.params["filters.methods"] == "all"
    assert runs[0].data.metrics["cifar10.resnet9.patch.potion.healed"] == pytest.approx(87.5)
    names = {Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"table.md", "table.csv", "runs.csv", "healed_vs_discovery.png", "healed_vs_discovery.pdf",
            "acc_drop_vs_discovery.png", "acc_drop_vs_discovery.pdf"} <= names


@pytest.mark.slow
def test_filters(report: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ssd"
    assert main(["--tracking-uri", report["uri"], "--out", str(out), "--methods", "ssd"]) == 0
    md = (out / "table.md").read_text()
    assert "| poisoned images | discovered | ssd |" in md and "potion" not in md.split(TITLE)[1]
    assert main(["--tracking-uri", report["uri"], "--out", str(out), "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no finished unlearning runs matching datasets=mnist in ")
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_empty_and_unknown_stores(template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri, _, _ = new_store(template, tmp_path / "empty")
    out = tmp_path / "out"
    assert main(["--tracking-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no finished unlearning runs in {uri} (all experiments); run unlearn.py first"
    assert main(["--tracking-uri", uri, "--experiment", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no MLflow experiment 'nope' in ") and len(err.splitlines()) == 1
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/missing.db", "--out", str(out)]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists() and not out.exists()


@pytest.mark.slow
def test_200_run_store_reports_fast(template: Path, tmp_path: Path) -> None:
    uri, client, exp_id = new_store(template, tmp_path / "big")
    discovery = ((None, 1), (0.01, None), (0.05, None), (0.1, None), (0.5, None))
    assert add_grid(client, exp_id, seeds=range(10), discovery=discovery) == 200
    import matplotlib.pyplot  # noqa: F401 - library imports are a per-process cost, not the report's

    import potion.core.io  # noqa: F401

    started = time.perf_counter()
    assert main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"reporting 200 runs took {elapsed:.1f} s"
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert sum(int(r["n_runs"]) for r in rows if r["discovery"] != "mean") == 200


# --------------------------------------------------------------------------- one row per measurement


@pytest.mark.slow
def test_a_sweep_and_a_standalone_run_of_the_same_settings_count_once(template: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's store: unlearn.py and sweep.py with the same config and seed reported as one seed (n=1)."""
    uri, client, exp_id = new_store(template, tmp_path / "overlap")
    same = {"n_p": 72, "share": 0.2, "seed": 0, "healed": 94.1, "acc_drop": 1.11}
    add_run(client, exp_id, config_hash="standalone", **same)
    parent = store_run(client, exp_id, {"tags": {"potion.task": "ptn_sweep", "potion.method": "potion"},
                                        "params": {"method": "potion", "override.discovery.share": "0.2"}},
                       run_name="ptn-sweep")
    for k in range(4):
        store_run(client, exp_id, {"tags": {"potion.task": "ptn_candidate", "potion.method": "potion"},
                                   "metrics": {"step": k, "forget_acc": 0.5}}, parent=parent)
    # The final run: its config pins the chosen step (another config hash); its folder path is spelled differently.
    store_run(client, exp_id, logged_run(config_hash="sweep-final", fixed_step=3, train_dir="runs/train/t", **same),
              parent=parent)
    add_run(client, exp_id, config_hash="standalone-seed-1", **{**same, "seed": 1, "healed": 92.1})
    out = tmp_path / "out"
    assert main(["--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 repeated run of the same settings and seed left out" in printed and "1 repeated runs" not in printed
    rows = read_csv(out / "table.csv")
    cell = next(r for r in rows if r["discovery"] == "20%")
    assert cell["n_runs"] == "2" and float(cell["healed_mean"]) == pytest.approx(93.1)  # seeds 0 and 1, once each
    assert sorted(r["seed"] for r in read_csv(out / "runs.csv")) == ["0", "1"]

    client.delete_run(next(r.info.run_id for r in client.search_runs([exp_id], "tags.`potion.config_hash` = "
                                                                               "'standalone-seed-1'")))
    assert main(["--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "| 72 | 20% | 94.10 / 1.11 |" in md and "n=2" not in md  # n=1: one run, no spread


def test_repeats_of_one_measurement_count_once_and_the_newest_wins() -> None:
    standalone = logged_run(config_hash="a", healed=90.0)
    final = logged_run(config_hash="b", fixed_step=5, healed=91.0, train_dir="elsewhere/t")  # a sweep's final run
    rerun = logged_run(config_hash="a", healed=92.0)  # force=true: same config again
    other_seed = logged_run(config_hash="c", seed=1)
    other_model = logged_run(config_hash="d", train="another-training-run")
    other_rho = logged_run(config_hash="e", rho="0.2")
    rows, left_out = measurements(rows_of(standalone, final, rerun, other_seed, other_model, other_rho))
    assert left_out == 2
    assert sorted(r["run_id"] for r in rows) == ["r2", "r3", "r4", "r5"]  # the rerun (newest of the three) counts
    assert next(r for r in rows if r["run_id"] == "r2")["healed"] == 92.0


def test_the_sweeper_keys_left_out_are_the_sweepers() -> None:
    from potion.sweep.protocol import SWEEPER_KEYS

    assert SWEEPER_PARAMS == SWEEPER_KEYS


# --------------------------------------------------------------------------- grouping and columns


def test_two_attacks_never_share_a_row() -> None:
    rows = rows_of(logged_run(config_hash="p", attack="patch", healed=90.0),
                   logged_run(config_hash="b", attack="blend", healed=40.0),
                   logged_run(config_hash="a", attack="patch", mapping="all_to_all", healed=70.0))
    cells = aggregate(rows)
    assert sorted((c["attack"], c["mapping"], c["healed_mean"], c["n_runs"]) for c in cells) == [
        ("blend", "all_to_one", 40.0, 1), ("patch", "all_to_all", 70.0, 1), ("patch", "all_to_one", 90.0, 1)]
    md = markdown_tables(cells)
    assert "## cifar10 · resnet9 · blended trigger" in md
    assert f"## {TITLE}, all-to-all labels" in md and f"## {TITLE}\n" in md
    assert md.count("| all | mean |") == 3
    suffixes = study_suffixes(study_of(c) for c in cells)  # the figures of each attack get their own files
    assert sorted(suffixes.values()) == ["_blend_all_to_one", "_patch_all_to_all", "_patch_all_to_one"]


def test_healed_attainable_sits_next_to_healed_and_missing_values_read_n_a() -> None:
    rows = rows_of(logged_run(config_hash="a", seed=0, healed=60.0, acc_drop=1.0, healed_attainable=90.0),
                   logged_run(config_hash="b", seed=1, healed=62.0, acc_drop=1.0, healed_attainable=94.0),
                   logged_run(config_hash="c", method="ssd", healed=50.0, acc_drop=2.0))
    md = markdown_tables(aggregate(rows))
    assert "Cells: healed / healed_attainable / acc_drop; each cell states its n (runs: one per seed)." in md
    assert "| 100 | 10% | 61.00 ± 1.41 / 92.00 ± 2.83 / 1.00 ± 0.00 (n=2) | 50.00 / n/a / 2.00 (n=1) |" in md
    assert "| all | mean | 61.00 / 92.00 / 1.00 | 50.00 / n/a / 2.00 |" in md
    plain = markdown_tables(aggregate(rows_of(logged_run(config_hash="d"))))  # no run has it: left out
    assert "healed_attainable" not in plain.split("## ")[1]


def test_a_method_run_with_other_settings_gets_its_own_column() -> None:
    rows = rows_of(logged_run(config_hash="a", rho="0.1", healed=90.0), logged_run(config_hash="b", rho="0.2",
                                                                                   healed=70.0))
    cells = aggregate(rows)
    assert {(c["method"], c["n_runs"]) for c in cells} == {("potion (ptn.rho=0.1)", 1), ("potion (ptn.rho=0.2)", 1)}


def test_uneven_cells_show_n_and_cell_counts() -> None:
    base = {"dataset": "d", "model": "m", "attack": "patch", "mapping": "all_to_one", "method_params": (),
            "n_p": 100, "n_f": 10, "share": 0.1, "acc_drop": 1.0, "clean_acc": 0.9, "asr": 0.0, "unlearn_seconds": 1.0}
    rows = [{**base, "method": m, "healed": h} for m, h in (("a", 90), ("a", 92), ("b", 70))]
    rows.append({**rows[0], "n_f": 1, "share": 0.01, "healed": 50.0})
    md = markdown_tables(aggregate(rows))
    assert "| 100 | 1 image | 50.00 / 1.00 (n=1) | – |" in md
    assert "| 100 | 10% | 91.00 ± 1.41 / 1.00 ± 0.00 (n=2) | 70.00 / 1.00 (n=1) |" in md
    assert "| all | mean | 70.50 / 1.00 | 70.00 / 1.00 (1/2 cells) |" in md


# --------------------------------------------------------------------------- figures


def test_figures_use_plain_words_and_readable_upright_ticks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import potion.reporting.figures as module
    from potion.reporting.figures import plot_metric

    figures = []
    save = module.save_figure_formats

    def keep(fig: Any, stem: Any, formats: Any = ("png", "pdf"), dpi: int = 300, tight: bool = True) -> list[Path]:
        from matplotlib.text import Text

        ticks = {id(t) for ax in fig.axes for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]}
        texts = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
        figures.append([(t.get_text(), t.get_fontsize(), t.get_rotation() if id(t) in ticks else 0.0)
                        for t in texts])
        return save(fig, stem, formats, dpi, tight)

    monkeypatch.setattr(module, "save_figure_formats", keep)
    shares = (None, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's 11 discovery settings
    rows = rows_of(*(logged_run(config_hash=f"{n_p}-{s}", n_p=n_p, share=s, count=None if s else 1,
                                healed=50 + 40 * (s or 0)) for n_p in (72, 500) for s in shares))
    paths = plot_metric(aggregate(rows), "healed", tmp_path / "healed_vs_discovery", title="t")
    assert [p.name for p in paths] == ["healed_vs_discovery.png", "healed_vs_discovery.pdf"]
    width, height, dpi = png_size_and_dpi(paths[0].read_bytes())
    assert dpi == pytest.approx(300, abs=0.5) and width > 3000 and height > 900
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    (texts,) = figures
    words = [t for t, _, _ in texts]
    assert "72 poisoned training images" in words and "500 poisoned training images" in words
    assert "1 image" in words and "100%" in words and not any("n_p" in w for w in words)
    assert min(size for _, size, _ in texts) >= 9 and {rot for _, _, rot in texts} == {0.0}  # ticks upright


# --------------------------------------------------------------------------- a swept cell's cost, n, --out


@pytest.mark.slow
def test_a_swept_cell_costs_its_whole_sweep(template: Path, tmp_path: Path) -> None:
    """The issue's store: the final job took 21.8 s, its sweep 271.7 s; the cell's time is the sweep's."""
    uri, client, exp_id = new_store(template, tmp_path / "swept")
    parent = store_run(client, exp_id, {"tags": {"potion.task": "ptn_sweep", "potion.method": "potion"},
                                        "metrics": {"ptn_wall_seconds": 271.7}}, run_name="ptn-sweep")
    final = logged_run(config_hash="sweep-final", fixed_step=3, n_p=72, share=0.1)
    final["tags"]["potion.sweep_id"] = parent
    final["metrics"]["unlearn_seconds"] = 21.8
    store_run(client, exp_id, final, parent=parent)
    standalone = logged_run(method="ssd", config_hash="ssd", n_p=72, share=0.1)
    standalone["metrics"]["unlearn_seconds"] = 39.6
    store_run(client, exp_id, standalone)
    out = tmp_path / "out"
    assert main(["--tracking-uri", uri, "--out", str(out)]) == 0
    cells = {r["method"]: r for r in read_csv(out / "table.csv") if r["discovery"] == "10%"}
    assert float(cells["potion"]["unlearn_seconds_mean"]) == pytest.approx(271.7)  # the whole sweep
    assert float(cells["ssd"]["unlearn_seconds_mean"]) == pytest.approx(39.6)
    runs = {r["method"]: r for r in read_csv(out / "runs.csv")}
    assert runs["potion"]["swept"] == "True" and float(runs["potion"]["final_job_seconds"]) == pytest.approx(21.8)
    assert runs["ssd"]["swept"] == "False"
    md = (out / "table.md").read_text()
    assert "whole sweep's wall clock" in md and "n=1 run per cell" in md


def test_every_table_states_n() -> None:
    base = {"dataset": "d", "model": "m", "attack": "patch", "mapping": "all_to_one", "method_params": (),
            "n_p": 100, "n_f": 10, "share": 0.1, "acc_drop": 1.0, "clean_acc": 0.9, "asr": 0.0, "unlearn_seconds": 1.0}
    two = markdown_tables(aggregate([{**base, "method": "a", "healed": h} for h in (90, 92)]))
    assert "Cells: healed / acc_drop; n=2 runs per cell (one per seed)." in two
    one = markdown_tables(aggregate([{**base, "method": "a", "healed": 90}]))
    assert "n=1 run per cell (one seed: no ± spread)" in one


@pytest.mark.slow  # a migrated store (seconds)
def test_out_naming_a_file_is_one_error_about_out(template: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    uri, client, exp_id = new_store(template, tmp_path / "store")
    add_run(client, exp_id)
    a_file = tmp_path / "report.md"
    a_file.write_text("mine\n")
    assert main(["--tracking-uri", uri, "--out", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "out_dir=" not in err and "POTION_CACHE_DIR" not in err
    assert a_file.read_text() == "mine\n"
    assert main(["--tracking-uri", uri, "--out", str(a_file / "sub")]) == 2  # a folder below a file
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "out_dir=" not in err, err


def test_compute_sums_each_methods_seconds_per_processor_with_the_models() -> None:
    from potion.reporting.render import compute_markdown

    intel, amd = "Intel Xeon (avx512_bf16)", "AMD EPYC (avx2)"
    rows = [{"method": "potion", "cpu": amd, "unlearn_seconds": 10.0, "data_passes": 3.0},
            {"method": "potion", "cpu": amd, "unlearn_seconds": 20.0, "data_passes": 5.0},
            {"method": "rem", "cpu": amd, "unlearn_seconds": 3600.0, "data_passes": float("nan")},
            {"method": "potion", "cpu": intel, "unlearn_seconds": 7.0, "data_passes": 2.0}]
    models = [{"cpu": amd, "train_seconds": 1800.0}, {"cpu": amd, "train_seconds": None}]
    lines = compute_markdown(rows, models).splitlines()

    def row(cpu: str, what: str) -> list[str]:
        (line,) = [x for x in lines if x.startswith(f"| {cpu} | {what} |")]
        return [cell.strip() for cell in line.strip("|").split("|")][2:]

    assert row(amd, "potion") == ["2", "0.01", "15.0", "4.0"]  # 30 s; means over its two runs
    assert row(amd, "rem") == ["1", "1.00", "3600.0", "n/a"]  # a missing figure is n/a, not a zero
    assert row(amd, "trained models") == ["1", "0.50", "1800.0", ""]  # a model without seconds adds nothing
    assert row(amd, "**all**") == ["4", "**1.51**", "", ""]  # 30 + 3600 + 1800 s
    assert row(intel, "potion") == ["1", "0.00", "7.0", "2.0"]  # another processor: a total of its own


def test_a_commit_filter_keeps_only_that_codes_runs() -> None:
    """A study reports its frozen commit: a run of other code (or of uncommitted code, no commit) never stands in
    for one of its cells, not even as the newer repeat of the same settings."""
    rows = [{"run_id": "study", "method": "potion", "dataset": "d", "commit": "36a5cd458f2a"},
            {"run_id": "newer", "method": "potion", "dataset": "d", "commit": "23cb1c7e0000"},
            {"run_id": "edited", "method": "potion", "dataset": "d", "commit": None}]
    assert [r["run_id"] for r in select(rows, {"commits": ["36a5cd4"]})] == ["study"]
    assert [r["run_id"] for r in select(rows, {"commits": ["36a5cd4", "23cb"]})] == ["study", "newer"]
    assert len(select(rows, {"commits": []})) == 3  # no filter: every run
