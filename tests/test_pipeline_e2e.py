"""End to end on a tiny poisoned image folder: train.py's pipeline with MLflow, then every unlearning method."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tiny_world import train_overrides, write_pattern_folder

from potion.errors import ConfigError
from potion.io import load_tensors, read_json
from potion.quickstart import compose_config
from potion.train_pipeline import run_training
from potion.unlearn_pipeline import run_unlearning

FAST = {"retrain": ["method.iterations=60"], "finetune": ["method.iterations=30"], "eu_k": ["method.iterations=30"],
        "scrub": ["method.iterations=20", "method.max_steps=5"], "bad_teacher": ["method.iterations=30"],
        "discover_retrain": ["method.iterations=60"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(root / "cache"))
        mp.setenv("POTION_THREADS", "1")
        data = write_pattern_folder(root / "data")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        cfg = compose_config("train", train_overrides(data, root / "run", f"logger.tracking_uri={uri}"))
        summary = run_training(cfg)
        yield {"root": root, "uri": uri, "summary": summary, "run": root / "run"}


def test_training_logs_run_folder_and_mlflow(trained: dict) -> None:
    s, run = trained["summary"], trained["run"]
    assert s["asr"] >= 0.9 and s["clean_acc"] >= 0.9, s
    for name in ("model.safetensors", "poison_plan.json", "config.yaml", "summary.json"):
        assert (run / name).is_file()
    assert read_json(run / "summary.json")["asr"] == s["asr"]
    assert len(read_json(run / "poison_plan.json")["indices"]) == 16
    load_tensors(run / "model.safetensors")
    client = MlflowClient(trained["uri"])
    mrun = client.get_run(s["mlflow_run_id"])
    for key in ("clean_acc", "poison_acc", "asr"):
        assert mrun.data.metrics[key] == pytest.approx(s[key])
    assert mrun.data.params["poison.count"] == "16"
    assert len(client.get_metric_history(s["mlflow_run_id"], "train_loss")) == 8  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(s["mlflow_run_id"])}
    assert {"model.safetensors", "poison_plan.json", "config.yaml", "summary.json"} <= artifacts


def test_potion_heals_tiny_model(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion", "discovery.share=0.5",
                                     f"logger.tracking_uri={trained['uri']}", f"out_dir={tmp_path / 'u'}"])
    s = run_unlearning(cfg)
    assert s["asr"] < s["asr_before"] - 0.5, s  # the trigger clearly stops working
    assert s["acc_drop"] < 5.0, s  # clean accuracy within a few points
    assert s["healed"] > 50
    assert (tmp_path / "u" / "ptn_trajectory.png").is_file() and (tmp_path / "u" / "suspects.csv").is_file()
    run = MlflowClient(trained["uri"]).get_run(s["mlflow_run_id"])
    assert run.data.tags["potion.train_run_id"] == trained["summary"]["mlflow_run_id"]
    for key in ("clean_acc", "poison_acc", "asr", "healed", "acc_drop", "forget_acc", "poisoned_train_acc",
                "unlearn_seconds", "clean_acc_before", "poison_acc_before", "asr_before"):
        assert key in run.data.metrics, key
    history = MlflowClient(trained["uri"]).get_metric_history(s["mlflow_run_id"], "ptn_traj_forget_acc")
    assert len(history) == s["ptn_steps"]


@pytest.mark.parametrize("method", ["none", "ssd", "assd", "lfssd", "retrain", "eu_k", "finetune", "scrub",
                                    "bad_teacher", "potion_iterative", "discover_retrain"])
def test_every_method_runs(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", f"method={method}", "discovery.share=0.5",
                                     "logger=none", f"out_dir={tmp_path / method}", *FAST.get(method, [])])
    s = run_unlearning(cfg)
    assert 0.0 <= s["clean_acc"] <= 1.0 and s["method"] == method
    assert (tmp_path / method / "summary.json").is_file()
    if method == "none":
        assert s["acc_drop"] == 0 and s["healed"] == 0


def test_suspect_ranking_finds_undiscovered_poison(trained: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion", "discovery.share=0.25",
                                     "logger=none", f"out_dir={tmp_path / 's'}"])
    s = run_unlearning(cfg)
    prevalence = 12 / (320 - 4)  # undiscovered poison among the retain samples: what a random ranking's AP is
    assert s["suspect_ap"] > 0.5 > 5 * prevalence, s
    rows = (tmp_path / "s" / "suspects.csv").read_text().splitlines()
    plan = read_json(trained["run"] / "poison_plan.json")["indices"]
    top = [int(r.split(",")[1]) for r in rows[1:13]]
    assert len(set(top) & set(plan)) >= 6  # half of the top 12 are truly poisoned (random: ~0.5 expected)


def test_iterative_rounds_are_bounded_and_forget_set_never_shrinks(trained: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion_iterative", "method.rounds=2",
                                     "discovery.share=0.25", "logger=none", f"out_dir={tmp_path / 'i'}",
                                     "method.cutoff_fraction=0.01"])
    s = run_unlearning(cfg)
    assert 1 <= s["rounds_run"] <= 2
    sizes = [s[f"round{r}_forget_size"] for r in range(1, int(s["rounds_run"]) + 1)]
    assert sizes[0] == 4 and sizes == sorted(sizes)
    assert s["final_forget_size"] >= sizes[-1]


def test_unlearn_finds_the_training_run_from_train_overrides(trained: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid job names its poisoned model by train.py overrides; the finished run is reused, not retrained."""
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    data = trained["root"] / "data"
    train_args = ["+train=[" + ",".join(f"'{o}'" for o in train_overrides(data, trained["run"])) + "]"]
    before = (trained["run"] / "summary.json").stat().st_mtime_ns
    cfg = compose_config("unlearn", [*train_args, "method=none", "discovery.share=0.5", "logger=none",
                                     f"out_dir={tmp_path / 'n'}"])
    s = run_unlearning(cfg)
    assert Path(s["train_run"]).resolve() == trained["run"].resolve()
    assert (trained["run"] / "summary.json").stat().st_mtime_ns == before  # not retrained


def test_natural_target_criterion_finds_true_target_samples_without_labels(trained: dict, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    runs = {}
    for crit in ("exclude_true_target", "exclude_natural_target"):
        cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion", "discovery.share=1.0",
                                         "logger=none", f"out_dir={tmp_path / crit}", "suspects.enabled=false",
                                         f"method.ptn.criterion={crit}"])
        runs[crit] = run_unlearning(cfg)
    truth, found = runs["exclude_true_target"], runs["exclude_natural_target"]
    assert truth["forget_true_target"] >= 1  # the plan drew some target-class samples
    assert found["forget_natural_target"] == truth["forget_true_target"]
    assert found["criterion_samples"] == truth["criterion_samples"]


def test_target_only_suspects_never_flag_other_labels(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """An all-to-one backdoor's poison carries the target label: other labels rank last and are never flagged."""
    import torch

    from potion.data.poisoned import load_data, poison
    from potion.runs import load_trained_run
    from potion.suspects import find_suspects

    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    run = load_trained_run(trained["run"])
    data = poison(load_data(run.cfg.dataset), run.plan)
    poisoned = run.build_model(data.num_classes, data.channels).eval()
    torch.manual_seed(0)
    scrambled = run.build_model(data.num_classes, data.channels).eval()
    with torch.no_grad():  # a "healed" model that changed every sample's belief: many clean samples score high
        for p in scrambled.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean())
    n = len(data.bundle.train)
    retain, forget = torch.arange(4, n), torch.arange(4)
    args = dict(signature=False, cutoff_fraction=1e-6)
    loose, _ = find_suspects(poisoned, scrambled, data, retain, forget, target_only=False, **args)
    strict, _ = find_suspects(poisoned, scrambled, data, retain, forget, target_only=True, **args)
    labels = data.train_labels
    assert bool((labels[loose.flagged()] != run.plan.target).any())  # without the rule other labels are flagged
    assert strict.flagged().numel() > 0 and bool((labels[strict.flagged()] == run.plan.target).all())
    top = strict.idx[torch.argsort(strict.scores, descending=True)][: int((labels[retain] == run.plan.target).sum())]
    assert bool((labels[top] == run.plan.target).all())  # target-labelled samples rank first


def test_exact_signature_without_matches_flags_nothing(trained: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """All poison discovered: the trigger recovered from it matches no retain sample, so nothing is flagged."""
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion", "discovery.share=1.0",
                                     "logger=none", f"out_dir={tmp_path / 'all'}"])
    s = run_unlearning(cfg)
    assert s["suspect_signature_found"] == 1.0
    assert s["suspects_flagged"] == 0, s


@pytest.mark.parametrize("stop_on", ["forget", "discovered"])
def test_iterative_stopping_test_watches_the_chosen_set(trained: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, stop_on: str) -> None:
    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion_iterative", "method.rounds=2",
                                     "discovery.share=0.25", "logger=none", f"out_dir={tmp_path / stop_on}",
                                     f"method.stop_on={stop_on}", "method.signature=false",
                                     "method.cutoff_fraction=0.01", "suspects.enabled=false",
                                     "method.synthesis.enabled=false"])
    s = run_unlearning(cfg)
    assert s["rounds_run"] == 2 and s["round2_forget_size"] > s["round1_forget_size"] == 4, s
    assert s["round1_criterion_samples"] == 4
    watched = s["round1_forget_size"] if stop_on == "discovered" else s["round2_forget_size"]
    assert s["round2_criterion_samples"] == watched


def test_one_discovered_sample_reveals_the_trigger_pixels(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """From one discovered file, the pixels that recur among target-labelled samples flag all the other poison."""
    import torch

    from potion.data.poisoned import load_data, poison
    from potion.runs import load_trained_run
    from potion.suspects import find_signature, signature_matches, single_sample_mask

    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    run = load_trained_run(trained["run"])
    data = poison(load_data(run.cfg.dataset), run.plan)
    model = run.build_model(data.num_classes, data.channels).eval()
    plan = torch.tensor(run.plan.indices)
    keep = torch.ones(len(data.bundle.train), dtype=torch.bool)
    keep[plan[:1]] = False
    retain = torch.nonzero(keep).view(-1)
    sig = find_signature(model, data, plan[:1], retain, run.plan.target)
    assert sig is not None and sig.mask is not None and 0 < int(sig.mask.sum()) < sig.mask.numel()
    hits = retain[signature_matches(data, retain, sig)]
    assert set(hits.tolist()) == set(plan[1:].tolist())  # every other poisoned sample, nothing else
    noise = torch.rand_like(sig.patch) * 4 - 2  # a window no training sample carries: no signature
    assert single_sample_mask(data, noise, sig.row, sig.col, retain, run.plan.target) is None


def test_iterative_repair_fine_tunes_without_any_found_poison(trained: dict, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Repair trains only on samples outside the final forget set and never regrows a dampened weight."""

    import potion.unlearning.iterative as iterative

    monkeypatch.setenv("POTION_CACHE_DIR", str(trained["root"] / "cache"))
    seen: dict = {}
    real_stream, real_repair = iterative.tb.stream, iterative.repair_model

    def stream_spy(task, idx, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["batches_from"], seen["forget"] = set(idx.tolist()), set(task.forget_idx.tolist())
        return real_stream(task, idx, *a, **kw)

    def repair_spy(task, forget, original, healed, **kw):  # noqa: ANN001, ANN003, ANN202
        seen["kw"], seen["original"], seen["healed"] = kw, original, healed
        seen["repaired"], info = real_repair(task, forget, original, healed, **kw)
        return seen["repaired"], info

    monkeypatch.setattr(iterative.tb, "stream", stream_spy)
    monkeypatch.setattr(iterative, "repair_model", repair_spy)
    cfg = compose_config("unlearn", [f"train_run={trained['run']}", "method=potion_iterative", "method.rounds=2",
                                     "discovery.share=0.25", "logger=none", f"out_dir={tmp_path / 'r'}",
                                     "method.repair.iterations=20", "method.repair.lr=0.05"])
    s = run_unlearning(cfg)
    assert seen["kw"] == {"iterations": 20, "lr": 0.05}
    assert len(seen["forget"]) == s["final_forget_size"] > 4 and not seen["batches_from"] & seen["forget"]
    assert s["repair_retain_samples"] == len(seen["batches_from"]) == 320 - s["final_forget_size"]
    original = dict(seen["original"].named_parameters())
    healed = dict(seen["healed"].named_parameters())
    changed = dampened = 0
    for name, p in seen["repaired"].named_parameters():
        damp = healed[name] != original[name]
        dampened += int(damp.sum())
        changed += int((p != healed[name])[~damp].sum())
        assert bool((p.abs() <= healed[name].abs())[damp].all()), name  # dampening is never undone
    assert dampened > 0 and changed > 0  # it did dampen, and repair did train the other weights
    for bad in ("method.repair.iterations=-1", "method.repair.lr=0", "+method.repair.steps=3", "method.repair=5"):
        with pytest.raises(ConfigError, match="method.repair"):
            run_unlearning(compose_config("unlearn", [f"train_run={trained['run']}", "method=potion_iterative",
                                                      "logger=none", f"out_dir={tmp_path / 'bad'}", bad]))
