"""potion.report: tables, csv and plots of unlearning runs read from a real (sqlite) MLflow store."""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from potion.report import CSV_COLUMNS, aggregate, main, markdown_tables

pytestmark = pytest.mark.slow  # real sqlite MLflow stores (creating one takes seconds)

METHODS = ("potion", "ssd")
SIZES = (100, 500)
DISCOVERY = ((None, 1), (0.1, None), (0.5, None))  # (share, count): a single sample, 10 %, 50 %
SEEDS = (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def healed_of(method: str, n_p: int, d: int, seed: int) -> float:
    return {"potion": 90.0, "ssd": 80.0}[method] - 5 * d + 4 * seed + (n_p == 500)


def acc_drop_of(method: str, n_p: int, d: int, seed: int) -> float:
    return {"potion": 1.0, "ssd": 5.0}[method] + d + 0.5 * seed


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


def add_run(client, exp_id: str, *, method: str, n_p: int, share: float | None, count: int | None, seed: int,
            healed: float, acc_drop: float, config_hash: str, status: str | None = "FINISHED",
            dataset: str = "cifar10") -> str:
    """One unlearning run with the tags, params and metrics that potion.unlearn_pipeline logs."""
    from mlflow.entities import Metric, Param

    _clock[0] += 1000
    n_f = count if count is not None else max(1, round(share * n_p))
    run = client.create_run(exp_id, start_time=_clock[0], run_name=f"unlearn-{method}", tags={
        "potion.task": "unlearn", "potion.method": method, "potion.config_hash": config_hash,
        "potion.train_run_id": "train-run"})
    params = {"method.name": method, "discovery.share": str(share), "discovery.count": str(count),
              "discovery.seed": str(seed), "poison.count": str(n_p), "poison.fraction": "None", "poison.target": "0",
              "n_f": str(n_f), "n_p": str(n_p), "seed": str(seed), "dataset": dataset, "model.name": "resnet9"}
    metrics = {"clean_acc": 0.9, "poison_acc": 0.85, "asr": 0.02, "healed": healed, "acc_drop": acc_drop,
               "forget_acc": 0.1, "poisoned_train_acc": 0.8, "unlearn_seconds": 1.5, "clean_acc_before": 0.91,
               "poison_acc_before": 0.1, "asr_before": 0.99}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, _clock[0], 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params.items()])
    if status is not None:
        client.set_terminated(run.info.run_id, status, end_time=_clock[0] + 500)
    return run.info.run_id


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
    add_run(client, exp_id, method="potion", n_p=100, share=0.1, count=None, seed=0, healed=0.0, acc_drop=50.0,
            config_hash="potion-100-1-0")
    add_grid(client, exp_id)
    # A repeat of a finished config (same hash, same values), and runs that did not finish: all ignored.
    add_run(client, exp_id, method="potion", n_p=100, share=0.1, count=None, seed=0,
            healed=healed_of("potion", 100, 1, 0), acc_drop=acc_drop_of("potion", 100, 1, 0),
            config_hash="potion-100-1-0")
    add_run(client, exp_id, method="potion", n_p=100, share=0.1, count=None, seed=7, healed=-100.0, acc_drop=99.0,
            config_hash="running", status=None)
    add_run(client, exp_id, method="ssd", n_p=500, share=0.5, count=None, seed=7, healed=-100.0, acc_drop=99.0,
            config_hash="failed", status="FAILED")
    out = folder / "report"
    code = main(["--tracking-uri", uri, "--experiment", "potion", "--out", str(out), "--log-run"])
    return {"code": code, "out": out, "uri": uri, "client": client, "exp_id": exp_id}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_markdown_table_has_cell_mean_std_and_headline(report: dict) -> None:
    assert report["code"] == 0
    md = (report["out"] / "table.md").read_text()
    assert "## cifar10" in md
    assert "| n_p | discovery | potion | ssd |" in md
    # potion, n_p=100, 10 %: healed 85, 89 -> 87.00 ± 2.83; acc_drop 2.0, 2.5 -> 2.25 ± 0.35 (sample std)
    healed = [healed_of("potion", 100, 1, s) for s in SEEDS]
    assert (statistics.fmean(healed), round(statistics.stdev(healed), 2)) == (87.0, 2.83)
    row = next(line for line in md.splitlines() if line.startswith("| 100 | 10% |"))
    assert row.split(" | ")[2] == "87.00 ± 2.83 / 2.25 ± 0.35"
    # single-sample and percentage rows, sorted by n_p then share
    labels = [line.split(" | ")[:2] for line in md.splitlines() if line.startswith(("| 100 ", "| 500 ", "| all "))]
    assert labels == [["| 100", "1 sample"], ["| 100", "10%"], ["| 100", "50%"], ["| 100", "mean"],
                      ["| 500", "1 sample"], ["| 500", "10%"], ["| 500", "50%"], ["| 500", "mean"], ["| all", "mean"]]
    # headline: mean over the 6 cells of each method (hand-computed: potion 87.5 / 2.25, ssd 77.5 / 6.25)
    assert "| all | mean | 87.50 / 2.25 | 77.50 / 6.25 |" in md
    assert "(n=" not in md  # every cell holds its 2 seeds: the duplicate and unfinished runs did not count


def test_csv_long_format(report: dict) -> None:
    rows = read_csv(report["out"] / "table.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    cells = [r for r in rows if r["discovery"] != "mean"]
    assert len(cells) == len(METHODS) * len(SIZES) * len(DISCOVERY)
    assert {r["n_runs"] for r in cells} == {"2"}
    assert len(rows) == len(cells) + len(METHODS) * (len(SIZES) + 1)
    cell = next(r for r in cells if (r["method"], r["n_p"], r["discovery"]) == ("ssd", "500", "1 sample"))
    assert float(cell["healed_mean"]) == pytest.approx(83.0)
    assert float(cell["healed_std"]) == pytest.approx(math.sqrt(8))
    assert float(cell["acc_drop_mean"]) == pytest.approx(5.25)
    assert float(cell["clean_acc_mean"]) == pytest.approx(0.9)
    assert float(cell["unlearn_seconds_mean"]) == pytest.approx(1.5)
    overall = next(r for r in rows if (r["method"], r["n_p"], r["discovery"]) == ("potion", "all", "mean"))
    assert (float(overall["healed_mean"]), float(overall["acc_drop_mean"])) == (87.5, 2.25)
    assert overall["healed_std"] == "" and overall["n_runs"] == "12"


def test_plots_are_png(report: dict) -> None:
    for name in ("healed_vs_discovery.png", "acc_drop_vs_discovery.png"):
        data = (report["out"] / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not list(report["out"].glob(".*.tmp"))


def test_log_run_records_artifacts(report: dict) -> None:
    client = report["client"]
    runs = client.search_runs([report["exp_id"]], "tags.`potion.task` = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["n_runs"] == "24"
    assert runs[0].data.params["filters.methods"] == "all"
    assert runs[0].data.metrics["cifar10.potion.healed"] == pytest.approx(87.5)
    names = {Path(a.path).name for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"table.md", "table.csv", "healed_vs_discovery.png", "acc_drop_vs_discovery.png"} <= names


def test_filters(report: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ssd"
    assert main(["--tracking-uri", report["uri"], "--out", str(out), "--methods", "ssd"]) == 0
    md = (out / "table.md").read_text()
    assert "| n_p | discovery | ssd |" in md and "potion" not in md.split("## cifar10")[1]
    assert main(["--tracking-uri", report["uri"], "--out", str(out), "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no finished unlearning runs matching datasets=mnist in ")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_empty_and_unknown_stores(template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri, _, _ = new_store(template, tmp_path / "empty")
    out = tmp_path / "out"
    assert main(["--tracking-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no finished unlearning runs in {uri} (experiment potion); run unlearn.py first"
    assert main(["--tracking-uri", uri, "--experiment", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no MLflow experiment 'nope' in ") and len(err.splitlines()) == 1
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/missing.db", "--out", str(out)]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists() and not out.exists()


def test_uneven_cells_show_n_and_cell_counts() -> None:
    rows = [{"dataset": "d", "method": m, "n_p": 100, "n_f": 10, "share": 0.1, "healed": h, "acc_drop": 1.0,
             "clean_acc": 0.9, "asr": 0.0, "unlearn_seconds": 1.0} for m, h in (("a", 90), ("a", 92), ("b", 70))]
    rows.append({**rows[0], "n_f": 1, "share": 0.01, "healed": 50.0})
    cells = aggregate(rows)
    md = markdown_tables(cells)
    assert "| 100 | 1 sample | 50.00 / 1.00 (n=1) | – |" in md
    assert "| 100 | 10% | 91.00 ± 1.41 / 1.00 ± 0.00 (n=2) | 70.00 / 1.00 (n=1) |" in md
    assert "| all | mean | 70.50 / 1.00 | 70.00 / 1.00 (1/2 cells) |" in md


def test_200_run_store_reports_fast(template: Path, tmp_path: Path) -> None:
    uri, client, exp_id = new_store(template, tmp_path / "big")
    discovery = ((None, 1), (0.01, None), (0.05, None), (0.1, None), (0.5, None))
    assert add_grid(client, exp_id, seeds=range(10), discovery=discovery) == 200
    import matplotlib.pyplot  # noqa: F401 - library imports are a per-process cost, not the report's

    import potion.io  # noqa: F401

    started = time.perf_counter()
    assert main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"reporting 200 runs took {elapsed:.1f} s"
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert sum(int(r["n_runs"]) for r in rows if r["discovery"] != "mean") == 200
