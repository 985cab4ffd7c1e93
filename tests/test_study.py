"""The study's machinery: the tier's training subset, and a study resumed on a fresh machine skipping the cells
already in its store at this commit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyRun

from potion.config.compose import compose_config
from potion.data.poisoned import train_subset
from potion.data.sources import DatasetBundle, ImageSplit


def _bundle(n: int = 100) -> DatasetBundle:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[:n]
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return DatasetBundle("toy", ImageSplit(images, labels), ImageSplit(images[:4], labels[:4]), ("a", "b", "c"),
                         (0.5,), (0.25,), "toy-fp")


def test_the_training_subset_is_class_balanced_seeded_and_in_order() -> None:
    b = _bundle()
    sub = train_subset(b, 10, seed=3)
    assert torch.bincount(sub.train.labels).tolist() == [5, 3, 2]  # each class its share of the split
    picked = sub.train.images[:, 0, 0, 0].long()
    assert torch.equal(picked, picked.sort().values)  # kept in the split's order
    assert torch.equal(sub.train.labels, b.train.labels[picked])  # images and labels stay paired
    assert torch.equal(train_subset(b, 10, seed=3).train.images, sub.train.images)  # same seed, same samples
    assert not torch.equal(train_subset(b, 10, seed=4).train.images, sub.train.images)
    assert sub.fingerprint != b.fingerprint and sub.test is b.test
    assert train_subset(b, 1000, seed=0) is b  # asking for more than there is keeps the split


def test_a_cell_is_matched_by_the_commit_of_its_code_not_by_head(tmp_path: Path) -> None:
    """Committing the study's store or a note moves HEAD but not the code commit; uncommitted code has none."""
    import git

    from potion.pipelines.study_cells import code_commit

    repo = git.Repo.init(tmp_path)
    with repo.config_writer() as c:
        c.set_value("user", "name", "t").set_value("user", "email", "t@example.org")
    (tmp_path / "potion").mkdir()
    (tmp_path / "potion" / "m.py").write_text("x = 1\n")
    repo.index.add(["potion/m.py"])
    code = repo.index.commit("code").hexsha
    (tmp_path / "notes.md").write_text("a figure\n")
    repo.index.add(["notes.md"])
    head = repo.index.commit("store").hexsha
    assert code_commit(tmp_path / "potion") == code != head
    (tmp_path / "potion" / "m.py").write_text("x = 2\n")
    assert code_commit(tmp_path) is None  # an edited module: the cell's code is no commit's
    (tmp_path / "potion" / "m.py").write_text("x = 1\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "new.yaml").write_text("a: 1\n")
    assert code_commit(tmp_path) is None  # a new config not yet committed
    assert code_commit(tmp_path.parent / "elsewhere") is None  # no checkout


@pytest.mark.slow  # two unlearning runs on the shared model, logged to a store
def test_a_study_cell_already_in_the_store_at_this_commit_is_skipped(tiny: TinyRun, tmp_path: Path) -> None:
    from potion.pipelines.study_cells import current_commit
    from potion.pipelines.unlearn import run_unlearning

    if current_commit() is None:
        pytest.skip("no code commit to match cells by (not a git checkout, or its code has uncommitted changes)")
    uri = f"sqlite:///{tmp_path / 'study.db'}"

    def cell(out: str) -> dict:
        return run_unlearning(compose_config("unlearn", [
            f"train_run={tiny.run}", "method=ssd", "discovery.share=0.5", f"logger.tracking_uri={uri}",
            f"out_dir={tmp_path / out}", "suspects.enabled=false", "+skip_logged=true"]))

    first = cell("a")
    second = cell("b")  # another machine: no run folder, the same store
    assert not first.get("logged") and second["logged"] is True
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and second["commit"] == current_commit()
    assert second["asr"] == pytest.approx(first["asr"])
    assert not (tmp_path / "b").exists()  # nothing was run


def _row(method: str, seed: int, healed: float, drop: float) -> dict:
    return {"dataset": "d", "model": "m", "attack": "patch", "mapping": "all_to_one", "n_p": 100, "n_f": 10,
            "share": 0.1, "method": method, "seed": str(seed), "healed_attainable": healed, "acc_drop": drop,
            "asr": 0.05}


def test_better_is_said_only_where_the_paired_seeds_show_it() -> None:
    from potion.reporting.compare import comparisons, paired_verdict

    assert paired_verdict([1.0, 2.0, 3.0]) == (2.0, False)  # t = 3.46, below the 4.30 of two degrees of freedom
    assert paired_verdict([1.0, 1.1, 0.9]) == (pytest.approx(1.0), True)  # t = 17.3
    assert paired_verdict([2.0]) == (2.0, False)  # one pair says nothing
    rows = [_row("potion", s, h, 1.0) for s, h in enumerate((95.0, 96.0, 97.0))]
    rows += [_row("ssd", s, h, 1.0 + d) for s, (h, d) in enumerate(((50.0, 0.5), (60.0, -0.5), (40.0, 0.2)))]
    rows += [_row("rem", s, h, 1.0) for s, h in enumerate((96.0, 95.0, 97.5))]
    by = {e["method"]: e for e in comparisons(rows)}
    assert by["ssd"]["healed_attainable_verdict"] == "better" and by["ssd"]["n_pairs"] == 3
    assert by["ssd"]["acc_drop_verdict"] == "no difference shown"  # differences of both signs
    assert by["rem"]["healed_attainable_verdict"] == "no difference shown"  # within the seeds' spread
    assert by["rem"]["healed_attainable_diff"] == pytest.approx((-1 + 1 - 0.5) / 3)


def test_the_tier_models_travel_as_finished_run_folders_only(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_models", Path(__file__).parent.parent / "benchmarks"
                                                  / "study_models.py")
    assert spec is not None and spec.loader is not None
    study_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_models)
    done, half = tmp_path / "runs" / "study_cpu-a", tmp_path / "runs" / "study_cpu-b"
    for folder in (done, half):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w")
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"pickle")
    (done / "summary.json").write_text('{"config_hash": "a"}')
    kept = tmp_path / "kept"
    assert study_models.copy_run(done, kept / done.name)
    assert not study_models.copy_run(half, kept / half.name)  # unfinished: no summary.json
    assert not study_models.copy_run(done, kept / done.name)  # already there
    assert sorted(p.name for p in (kept / done.name).iterdir()) == ["model.safetensors", "summary.json"]


def test_the_targets_are_checked_from_the_cells_and_a_miss_is_kept() -> None:
    from potion.reporting.aggregate import aggregate
    from potion.reporting.compare import comparisons
    from potion.reporting.targets import target_rows, targets_markdown

    rows = [{**_row("potion", s, h, d), "asr": a, "unlearn_seconds": 10.0, "n_p": 100, "n_f": 10, "share": 0.1,
             "column": "potion", "method_params": ()}
            for s, (h, d, a) in enumerate(((95.0, 1.0, 0.02), (93.0, 2.5, 0.04), (94.0, 3.1, 0.03)))]
    rows += [{**_row("rem", s, 96.0, 1.0), "unlearn_seconds": 30.0, "n_p": 100, "n_f": 10, "share": 0.1,
              "column": "rem", "method_params": ()} for s in range(3)]
    out = {r["target"]: r for r in target_rows(aggregate(rows), comparisons(rows))}
    assert out["potion at 10%: healed_attainable >= 90"]["met"]
    assert out["potion at 10%: asr <= 0.05"]["met"]
    assert not out["potion at 10%: acc_drop <= 2"]["met"]  # mean 2.2: a miss is a row, not dropped
    assert out["potion at 10% not worse than rem"]["met"]  # 94 vs 96 within the seeds: no difference shown
    assert out["potion at 10%: time <= 0.2 x rem's"]["value"] == pytest.approx(1 / 3)
    assert not out["potion at 10%: time <= 0.2 x rem's"]["met"]
    assert "**no**" in targets_markdown(list(out.values()))
    one = [r for r in rows if r["method"] == "potion" or r["seed"] == "0"]  # rem on one seed: nothing is tested
    row = {r["target"]: r for r in target_rows(aggregate(one), comparisons(one))}["potion at 10% not worse than rem"]
    assert row["value"] == "untested (1 seed pair)" and not row["met"] and row["n"] == 1


def test_a_column_named_by_a_resolved_setting_is_still_the_methods_target_cell() -> None:
    """All-to-all: potion resolves loss=auto to ce at 10 % and to logit_norm at one sample (one label shows), so
    the study's potion columns carry the loss; each is still potion's cell of its discovery setting."""
    from potion.reporting.aggregate import aggregate
    from potion.reporting.targets import target_rows

    rows = [{**_row("potion", s, 50.0, 1.0), "asr": 0.2, "n_p": 100, "n_f": n_f, "share": n_f / 100,
             "method_params": (("method.loss", loss),)}
            for s in range(3) for n_f, loss in ((10, "ce"), (1, "logit_norm"))]
    cells = aggregate(rows)
    assert sorted(c["method"] for c in cells) == ["potion (method.loss=ce)", "potion (method.loss=logit_norm)"]
    got = {r["target"]: r["value"] for r in target_rows(cells, [])}
    assert got["potion at 10%: healed_attainable >= 90"] == 50.0
    assert got["potion at 10%: asr <= 0.05"] == pytest.approx(0.2)
    assert got["potion at 1 image: healed_attainable >= 80"] == 50.0
