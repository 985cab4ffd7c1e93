"""End to end on the session's tiny poisoned model (tests/conftest.py): train.py's pipeline with MLflow, then every
registered unlearning method, each shown to change the model in its own way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyRun
from mlflow.tracking import MlflowClient
from tiny_world import train_overrides

from potion.config.compose import compose_config
from potion.core.errors import ConfigError
from potion.core.io import load_tensors, read_json
from potion.pipelines.unlearn import run_unlearning
from potion.unlearning.methods import METHODS, method_info
from potion.unlearning.training_based import parameterised_layers

pytestmark = pytest.mark.slow  # a trained model, pipeline runs

FAST = {"retrain": ["method.iterations=60"], "finetune": ["method.iterations=30", "method.k=1"],
        "eu_k": ["method.iterations=30"], "scrub": ["method.iterations=20", "method.max_steps=5"],
        "bad_teacher": ["method.iterations=30"], "discover_retrain": ["method.iterations=60"],
        "potion_iterative": ["method.repair.iterations=30"], "rem": ["method.epochs=1"]}

State = dict[str, torch.Tensor]


def unlearn(tiny: TinyRun, out: Path, *overrides: str) -> dict:
    """One unlearning run on the shared model, logged nowhere, written to ``out``."""
    return run_unlearning(compose_config("unlearn", [f"train_run={tiny.run}", "logger=none", f"out_dir={out}",
                                                     *overrides]))


def test_training_logs_run_folder_and_mlflow(tiny: TinyRun) -> None:
    s, run = tiny.summary, tiny.run
    assert s["asr"] >= 0.9 and s["clean_acc"] >= 0.9, s
    for name in ("model.safetensors", "poison_plan.json", "config.yaml", "summary.json"):
        assert (run / name).is_file()
    assert read_json(run / "summary.json")["asr"] == s["asr"]
    assert len(read_json(run / "poison_plan.json")["indices"]) == 16
    load_tensors(run / "model.safetensors")
    client = MlflowClient(tiny.uri)
    mrun = client.get_run(s["mlflow_run_id"])
    for key in ("clean_acc", "poison_acc", "asr"):
        assert mrun.data.metrics[key] == pytest.approx(s[key])
    assert mrun.data.params["poison.count"] == "16"
    assert len(client.get_metric_history(s["mlflow_run_id"], "train_loss")) == 8  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(s["mlflow_run_id"])}
    assert {"model.safetensors", "poison_plan.json", "config.yaml", "summary.json"} <= artifacts


def test_potion_heals_tiny_model(tiny: TinyRun, tmp_path: Path) -> None:
    s = unlearn(tiny, tmp_path / "u", "method=potion", "discovery.share=0.5", "logger=mlflow",
                f"logger.tracking_uri={tiny.uri}")
    assert s["asr"] < s["asr_before"] - 0.5, s  # the trigger clearly stops working
    assert s["acc_drop"] < 5.0, s  # clean accuracy within a few points
    assert s["healed"] > 50
    assert (tmp_path / "u" / "ptn_trajectory.png").is_file() and (tmp_path / "u" / "suspects.csv").is_file()
    run = MlflowClient(tiny.uri).get_run(s["mlflow_run_id"])
    assert run.data.tags["potion.train_run_id"] == tiny.summary["mlflow_run_id"]
    for key in ("clean_acc", "poison_acc", "asr", "healed", "acc_drop", "forget_acc", "poisoned_train_acc",
                "unlearn_seconds", "clean_acc_before", "poison_acc_before", "asr_before"):
        assert key in run.data.metrics, key
    history = MlflowClient(tiny.uri).get_metric_history(s["mlflow_run_id"], "ptn_traj_forget_acc")
    assert len(history) == s["ptn_steps"]


# ------------------------------------------------------------------------- every method, its own kind of change


def _cosines(a: State, b: State, names: list[str]) -> list[float]:
    """Per weight matrix (conv, linear: batch-norm scales sit near 1 in any model), the cosine of a and b."""
    return [float(torch.nn.functional.cosine_similarity(a[n].flatten(), b[n].flatten(), dim=0))
            for n in names if a[n].dim() >= 2]


def _params(state: State) -> list[str]:
    return [n for n, v in state.items() if v.is_floating_point() and "running_" not in n]


def _unchanged(before: State) -> Callable[[State], None]:
    def check(after: State) -> None:
        assert all(torch.equal(before[n], after[n]) for n in before), "the model must stay bit-identical"
    return check


def _changed(before: State) -> Callable[[State], None]:
    def check(after: State) -> None:  # a method with no entry in EXPECTED: the healed model is another model
        assert any(not torch.equal(before[n], after[n]) for n in _params(before)), "the model did not change"
    return check


def _dampened(before: State) -> Callable[[State], None]:
    def check(after: State) -> None:
        params = _params(before)
        for n in params:  # dampening scales weights by factors in [0, 1]: never larger, never flipped
            assert bool((after[n].abs() <= before[n].abs()).all() and (after[n] * before[n] >= 0).all()), n
        assert sum(int((after[n].abs() < before[n].abs()).sum()) for n in params) > 0, "nothing was dampened"
        assert all(torch.equal(before[n], after[n]) for n in before if n not in params)  # batch-norm statistics
    return check


def _counters(state: State) -> list[int]:
    return [int(v) for n, v in state.items() if n.endswith("num_batches_tracked")]


def _fresh(before: State, steps: int) -> Callable[[State], None]:
    def check(after: State) -> None:  # a new model trained from scratch: every tensor new, batch-norm counted anew
        assert all(not torch.equal(before[n], after[n]) for n in before if not n.endswith("num_batches_tracked"))
        assert _counters(after) == [steps] * len(_counters(before)) != _counters(before)
    return check


def _fine_tuned(before: State) -> Callable[[State], None]:
    def check(after: State) -> None:  # trained on from the poisoned weights: changed, but close to them
        assert any(not torch.equal(before[n], after[n]) for n in _params(before))
        assert min(_cosines(before, after, _params(before))) > 0.9
        assert all(a >= b for a, b in zip(_counters(after), _counters(before), strict=True))  # not reset
    return check


def _only_last(before: State, k: int, reinitialised_for: int | None) -> Callable[[State], None]:
    def check(after: State) -> None:
        from potion.models import build_model

        model = build_model("small_cnn", num_classes=4, in_channels=3, width=8)
        last = {f"{name}." for name, _ in parameterised_layers(model)[-k:]}
        inside = [n for n in before if any(n.startswith(p) for p in last)]
        assert inside and all(torch.equal(before[n], after[n]) for n in before if n not in inside)
        changed = [n for n in _params(before) if n in inside and not torch.equal(before[n], after[n])]
        assert changed, "the last layers did not change"
        counters = [int(after[n]) for n in inside if n.endswith("num_batches_tracked")]
        if reinitialised_for is not None:  # re-initialised, then trained: batch-norm counted from zero
            assert counters == [reinitialised_for], counters
    return check


# How each built-in method changes the model; a method without an entry gets the check its capabilities imply.
EXPECTED: dict[str, Callable[[State], Callable[[State], None]]] = {
    "none": _unchanged, "ssd": _dampened, "assd": _dampened, "lfssd": _dampened, "potion": _dampened,
    "retrain": lambda before: _fresh(before, 60), "discover_retrain": lambda before: _fresh(before, 60),  # FAST
    "scrub": _fine_tuned, "bad_teacher": _fine_tuned,
    "potion_iterative": _fine_tuned, "rem": _fine_tuned,
    "finetune": lambda before: _only_last(before, 1, None),  # FAST: method.k=1
    "eu_k": lambda before: _only_last(before, 2, 30),  # conf/method/eu_k.yaml: k=2 (a batch norm, the classifier)
}


def expected(method: str) -> Callable[[State], Callable[[State], None]]:
    """The method's entry in EXPECTED, else what its registered capabilities say."""
    info = method_info(method)
    return EXPECTED.get(method, _dampened if info.dampens else _unchanged if not info.changes_model else _changed)


def test_the_expected_changes_agree_with_the_capabilities() -> None:
    assert {m for m in METHODS if expected(m) is _dampened} == {m for m in METHODS if method_info(m).dampens}
    assert {m for m in METHODS if expected(m) is _unchanged} == {m for m in METHODS if not method_info(m).changes_model}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_changes_the_model_in_its_own_way(tiny: TinyRun, tmp_path: Path, method: str) -> None:
    s = unlearn(tiny, tmp_path / method, f"method={method}", "discovery.share=0.5", *FAST.get(method, []))
    assert s["method"] == method and 0.0 <= s["clean_acc"] <= 1.0
    before, after = load_tensors(tiny.run / "model.safetensors"), load_tensors(tmp_path / method / "model.safetensors")
    assert set(after) == set(before)
    expected(method)(before)(after)
    if not method_info(method).changes_model:
        assert s["acc_drop"] == 0 and s["healed"] == 0 and s["clean_acc"] == s["clean_acc_before"]
        assert "suspects_flagged" not in s  # nothing changed: no ranking of what healing changed


# ------------------------------------------------------------------------------------------------- suspects


def test_suspect_ranking_finds_undiscovered_poison(tiny: TinyRun, tmp_path: Path) -> None:
    s = unlearn(tiny, tmp_path / "s", "method=potion", "discovery.share=0.25")
    prevalence = 12 / (320 - 4)  # undiscovered poison among the retain samples: what a random ranking's AP is
    assert s["suspect_ap"] > max(0.5, 5 * prevalence), s
    rows = (tmp_path / "s" / "suspects.csv").read_text().splitlines()
    plan = read_json(tiny.run / "poison_plan.json")["indices"]
    top = [int(r.split(",")[1]) for r in rows[1:13]]
    assert len(set(top) & set(plan)) >= 6  # half of the top 12 are truly poisoned (random: ~0.5 expected)


def test_iterative_rounds_are_bounded_and_forget_set_never_shrinks(tiny: TinyRun, tmp_path: Path) -> None:
    s = unlearn(tiny, tmp_path / "i", "method=potion_iterative", "method.rounds=2", "discovery.share=0.25",
                "method.cutoff_fraction=0.01")
    assert 1 <= s["rounds_run"] <= 2
    sizes = [s[f"round{r}_forget_size"] for r in range(1, int(s["rounds_run"]) + 1)]
    assert sizes[0] == 4 and sizes == sorted(sizes)
    assert s["final_forget_size"] >= sizes[-1]


def test_unlearn_finds_the_training_run_from_train_overrides(tiny: TinyRun, tmp_path: Path) -> None:
    """A grid job names its poisoned model by train.py overrides; the finished run is reused, not retrained."""
    train_args = ["+train=[" + ",".join(f"'{o}'" for o in train_overrides(tiny.data, tiny.run)) + "]"]
    before = (tiny.run / "summary.json").stat().st_mtime_ns
    s = run_unlearning(compose_config("unlearn", [*train_args, "method=none", "discovery.share=0.5", "logger=none",
                                                  f"out_dir={tmp_path / 'n'}"]))
    assert Path(s["train_run"]).resolve() == tiny.run.resolve()
    assert (tiny.run / "summary.json").stat().st_mtime_ns == before  # not retrained


def _true_target_count(tiny: TinyRun, **discovery: Any) -> int:
    """How many discovered samples are target-class images by their true label (the answer key: tests only)."""
    from potion.data.discovery import discover
    from potion.data.poisoned import load_data
    from potion.pipelines.run_folders import load_trained_run

    run = load_trained_run(tiny.run)
    labels = load_data(run.cfg.dataset).train.labels
    return int((labels[discover(run.plan, **discovery).forget_idx] == run.plan.target).sum())


def test_natural_target_criterion_finds_true_target_samples_without_labels(tiny: TinyRun, tmp_path: Path) -> None:
    found = unlearn(tiny, tmp_path / "n", "method=potion", "discovery.share=1.0", "suspects.enabled=false",
                    "method.ptn.criterion=exclude_natural_target")
    truth = _true_target_count(tiny, share=1.0, seed=0)
    assert truth >= 1  # the plan drew some target-class samples
    assert found["forget_natural_target"] == truth
    assert found["criterion_samples"] == found["n_f"] - truth + found.get("synth_samples", 0)


def test_a_located_patch_leaves_natural_target_discovered_samples_out(tiny: TinyRun, tmp_path: Path) -> None:
    """A few discovered samples (trigger synthesis on) with a target-class image among them: PTN's stopping test,
    the paper's ``all`` by default, leaves it out once the located patch is taken out, instead of pushing a real
    target-class image out of its class (the quickstart's digits, 7 discovered with one true 0: acc_drop 12.3)."""
    from potion.data.discovery import discover
    from potion.data.poisoned import load_data
    from potion.pipelines.run_folders import load_trained_run

    run = load_trained_run(tiny.run)
    labels = load_data(run.cfg.dataset).train.labels
    seed = next(s for s in range(500)
                if (labels[discover(run.plan, count=3, seed=s).forget_idx] == run.plan.target).any())
    s = unlearn(tiny, tmp_path / "u", "method=potion", "discovery.count=3", f"discovery.seed={seed}",
                "suspects.enabled=false")
    truth = _true_target_count(tiny, count=3, seed=seed)
    assert s["ptn_criterion"] == "exclude_natural_target" and s["synth_samples"] > 0
    assert s["forget_natural_target"] == truth >= 1
    assert s["criterion_samples"] == 3 - truth + s["synth_samples"]


def test_target_only_suspects_never_flag_other_labels(tiny: TinyRun) -> None:
    """An all-to-one backdoor's poison carries the target label: other labels rank last and are never flagged."""
    from potion.data.defender import defender_view
    from potion.data.poisoned import load_data, poison
    from potion.pipelines.run_folders import load_trained_run
    from potion.unlearning.suspects import find_suspects

    run = load_trained_run(tiny.run)
    data = poison(load_data(run.cfg.dataset), run.plan)
    view = defender_view(data)
    poisoned = run.build_model(data.num_classes, data.channels).eval()
    torch.manual_seed(0)
    scrambled = run.build_model(data.num_classes, data.channels).eval()
    with torch.no_grad():  # a "healed" model that changed every sample's belief: many clean samples score high
        for p in scrambled.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean())
    n = len(data.bundle.train)
    retain, forget = torch.arange(4, n), torch.arange(4)
    args = dict(signature=False, cutoff_fraction=1e-6, target=run.plan.target)
    loose, _ = find_suspects(poisoned, scrambled, view, retain, forget, target_only=False, **args)
    strict, _ = find_suspects(poisoned, scrambled, view, retain, forget, target_only=True, **args)
    labels = view.labels
    assert bool((labels[loose.flagged()] != run.plan.target).any())  # without the rule other labels are flagged
    assert strict.flagged().numel() > 0 and bool((labels[strict.flagged()] == run.plan.target).all())
    top = strict.idx[torch.argsort(strict.scores, descending=True)][: int((labels[retain] == run.plan.target).sum())]
    assert bool((labels[top] == run.plan.target).all())  # target-labelled samples rank first


def test_exact_signature_without_matches_flags_nothing(tiny: TinyRun, tmp_path: Path) -> None:
    """All poison discovered: the trigger recovered from it matches no retain sample, so nothing is flagged."""
    s = unlearn(tiny, tmp_path / "all", "method=potion", "discovery.share=1.0")
    assert s["suspect_signature_found"] == 1.0
    assert s["suspects_flagged"] == 0, s


@pytest.mark.parametrize("stop_on", ["forget", "discovered"])
def test_iterative_stopping_test_watches_the_chosen_set(tiny: TinyRun, tmp_path: Path, stop_on: str) -> None:
    s = unlearn(tiny, tmp_path / stop_on, "method=potion_iterative", "method.rounds=2", "discovery.share=0.25",
                f"method.stop_on={stop_on}", "method.signature=false", "method.cutoff_fraction=0.01",
                "suspects.enabled=false", "method.synthesis.enabled=false", "method.repair.iterations=0",
                "method.ptn.criterion=all")
    assert s["rounds_run"] == 2 and s["round2_forget_size"] > s["round1_forget_size"] == 4, s
    assert s["round1_criterion_samples"] == 4
    watched = s["round1_forget_size"] if stop_on == "discovered" else s["round2_forget_size"]
    assert s["round2_criterion_samples"] == watched


def test_one_discovered_sample_reveals_the_trigger_pixels(tiny: TinyRun) -> None:
    """From one discovered file, the pixels that recur among target-labelled samples flag all the other poison."""
    from potion.data.defender import defender_view
    from potion.data.poison import patch_origin
    from potion.data.poisoned import load_data, poison
    from potion.pipelines.run_folders import load_trained_run
    from potion.unlearning.suspects import find_signature, signature_matches, single_sample_mask

    run = load_trained_run(tiny.run)
    data = poison(load_data(run.cfg.dataset), run.plan)
    view = defender_view(data)
    model = run.build_model(data.num_classes, data.channels).eval()
    plan = torch.tensor(run.plan.indices)
    keep = torch.ones(len(data.bundle.train), dtype=torch.bool)
    keep[plan[:1]] = False
    retain = torch.nonzero(keep).view(-1)
    sig = find_signature(model, view, plan[:1], retain, run.plan.target)
    assert sig is not None and sig.mask is not None
    # the mask's pixels, in image coordinates, are exactly the trigger's: no host pixel, none missing
    r0, c0 = patch_origin(run.plan.trigger, *data.bundle.train.images.shape[2:])
    k = run.plan.trigger.size
    trigger = {(r, c) for r in range(r0, r0 + k) for c in range(c0, c0 + k)}
    found = {(sig.row + i, sig.col + j) for i, j in torch.nonzero(sig.mask).tolist()}
    assert found == trigger
    hits = retain[signature_matches(view, retain, sig)]
    assert set(hits.tolist()) == set(plan[1:].tolist())  # every other poisoned sample, nothing else
    noise = torch.rand_like(sig.patch) * 4 - 2  # a window no training sample carries: no signature
    assert single_sample_mask(view, noise, sig.row, sig.col, retain, run.plan.target) is None


def test_a_repair_that_teaches_the_backdoor_back_is_rejected(tiny: TinyRun, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A repair after which more discovered samples carry their given (poisoned) label again is not kept: the
    model before repair is returned, and the summary says so."""
    import copy

    import potion.unlearning.iterative as iterative

    kept: dict = {}

    def reviving_repair(task, forget, original, healed, **kw):  # noqa: ANN001, ANN003, ANN202
        kept["healed"] = copy.deepcopy(healed)
        return copy.deepcopy(original), {"repair_seconds": 0.0}  # the backdoor entirely back

    monkeypatch.setattr(iterative, "repair_model", reviving_repair)
    s = unlearn(tiny, tmp_path / "r", "method=potion_iterative", "method.rounds=1", "discovery.share=0.25",
                "method.repair.iterations=5", "suspects.enabled=false")
    assert s["repair_rejected"] == 1.0 and "repair rejected" in s["iteration_note"]
    assert s["repair_forget_acc_after"] > s["repair_forget_acc_before"]
    saved = load_tensors(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in kept["healed"].state_dict().items())


def test_iterative_repair_fine_tunes_without_any_found_poison(tiny: TinyRun, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Repair trains only on samples outside the final forget set and never regrows a dampened weight."""

    import potion.unlearning.iterative as iterative

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
    s = unlearn(tiny, tmp_path / "r", "method=potion_iterative", "method.rounds=2", "discovery.share=0.25",
                "method.repair.iterations=20", "method.repair.lr=0.05")
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
        with pytest.raises(ConfigError, match="^method.repair"):
            unlearn(tiny, tmp_path / "bad", "method=potion_iterative", bad)
    assert not (tmp_path / "bad").exists()
