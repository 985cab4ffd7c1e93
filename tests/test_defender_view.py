"""Methods see what a defender sees: the stored training set, the given labels, the discovered indices and
what the user declares; never the poison plan, true labels, poison flags or the trigger function."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyRun
from PIL import Image
from tiny_world import train_overrides

from potion.config.compose import compose_config
from potion.core.errors import ConfigError
from potion.core.io import load_tensors
from potion.data.defender import TrainingView, defender_view
from potion.data.discovery import Discovery, discover
from potion.data.poison import TriggerSpec
from potion.data.poisoned import load_data, plan_from_config, poison
from potion.pipelines.run_folders import load_trained_run
from potion.pipelines.unlearn import make_task
from potion.unlearning.attack import AttackFacts, infer_attack
from potion.unlearning.methods import get_method
from potion.unlearning.task import UnlearnTask

ANSWER_KEY = ("PoisonPlan", "PoisonedData", "Trigger", "DatasetBundle", "flags", "plan", "true_labels")


def test_the_task_has_no_field_that_holds_the_answer_key() -> None:
    """The oracle is impossible, not forbidden: no field of what a method gets can hold the plan."""
    for cls in (UnlearnTask, TrainingView, AttackFacts, Discovery):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = f"{f.name}: {hints[f.name]}"
            assert not any(word in text for word in ANSWER_KEY), (cls.__name__, text)


@pytest.mark.parametrize(("labels", "declared", "expected"), [
    ([4, 4, 4], None, (4, False, None)),
    ([4, 2], None, (None, True, None)),
    ([4], {"mapping": "all_to_all"}, (None, True, None)),
    ([4, 4], {"target": 4, "clean_label": True}, (4, False, True)),
])
def test_attack_facts_are_inferred_from_the_discovered_labels_unless_declared(
        labels: list[int], declared: dict | None, expected: tuple) -> None:
    facts = infer_attack(torch.tensor(labels), declared, 10)
    assert (facts.target, facts.all_to_all, facts.clean_label) == expected
    assert facts.source["mapping"] == ("declared" if declared and {"mapping", "target"} & set(declared) else "inferred")
    assert facts.summary()["attack_source"].startswith("clean_label=")


@pytest.mark.parametrize(("labels", "declared", "message"), [
    ([4, 2], {"target": 4}, "attack.target=4: the discovered samples are labelled \\[2, 4\\]"),
    ([4, 2], {"mapping": "all_to_one"}, "attack.mapping=all_to_one: the discovered samples carry 2 labels"),
    ([4], {"target": 12}, "attack.target=12: must be a class index in \\[0, 9\\]"),
])
def test_a_declaration_the_data_contradicts_is_refused(labels: list[int], declared: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        infer_attack(torch.tensor(labels), declared, 10)


def _tiny_data(tiny: TinyRun):  # noqa: ANN202
    run = load_trained_run(tiny.run)
    return run, poison(load_data(run.cfg.dataset), run.plan)


def test_the_view_holds_the_triggers_in_the_pixels_and_nothing_else(tiny_data: Path, cache: Path) -> None:
    cfg = compose_config("train", train_overrides(tiny_data, cache / "unused"))  # the tiny model's plan, untrained
    bundle = load_data(cfg.dataset)
    data = poison(bundle, plan_from_config(bundle, cfg.poison))
    view = defender_view(data)
    poisoned = torch.tensor(data.plan.indices)
    clean = torch.ones(len(view), dtype=torch.bool)
    clean[poisoned] = False
    assert torch.equal(view.images[clean], data.bundle.train.images[clean])  # untouched samples as decoded
    assert torch.equal(view.labels, data.train_labels)  # the labels as the attacker left them
    triggered = data.trigger.apply(data.normalizer(data.bundle.train.images[poisoned]), None)
    assert torch.equal(view.images[poisoned], data.normalizer.to_uint8(triggered))  # painted in, stored as pixels
    assert view.fingerprint == defender_view(data).fingerprint  # content-addressed: the same view, the same key


@pytest.mark.parametrize("in_files", [False, True])
def test_training_writes_the_trigger_after_augmentation_or_learns_it_from_the_files(
        tiny_data: Path, cache: Path, in_files: bool) -> None:
    """The paper's protocol pastes the trigger after augmentation; ``train.trigger_in_files`` trains on the files as
    poisoned (the defender's view), so the victim's crop and flip move the trigger."""
    from types import SimpleNamespace

    from potion.pipelines.train import _train_loader

    cfg = compose_config("train", train_overrides(tiny_data, cache / "unused", f"train.trigger_in_files={in_files}"))
    bundle = load_data(cfg.dataset)
    data = poison(bundle, plan_from_config(bundle, cfg.poison))
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), global_rank=0, world_size=1)
    loader = _train_loader(data, cfg, trainer)
    assert torch.equal(loader.labels, data.train_labels)
    if in_files:
        assert torch.equal(loader.images, defender_view(data).images) and not loader.flags.any()
    else:
        assert torch.equal(loader.images, bundle.train.images) and torch.equal(loader.flags, data.train_flags)


def _scrambled(data):  # noqa: ANN001, ANN202
    """The same stored images and labels, with every answer-key field of the plan changed."""
    plan = data.plan
    rng = np.random.default_rng(7)
    true = tuple(int(v) for v in rng.permutation(list(plan.true_labels)))
    other = dataclasses.replace(plan, target=(plan.target + 1) % data.num_classes, true_labels=true,
                                mapping="all_to_all" if plan.mapping == "all_to_one" else "all_to_one",
                                trigger=TriggerSpec("sig"), meta={"scrambled": True})
    return dataclasses.replace(data, plan=other)


@pytest.mark.slow  # three methods on the shared model, twice each
@pytest.mark.parametrize("method", ["potion", "ssd", "potion_iterative"])
def test_scrambling_the_ground_truth_leaves_the_healed_weights_bit_identical(tiny: TinyRun, method: str,
                                                                             method_args) -> None:  # noqa: ANN001
    run, data = _tiny_data(tiny)
    discovery = discover(run.plan, count=2, seed=0)
    changes = {"repair": {"iterations": 10, "lr": 0.01}, "rounds": 2} if method == "potion_iterative" else {}
    args = method_args(method, **changes)

    def healed(d) -> dict[str, torch.Tensor]:  # noqa: ANN001
        torch.manual_seed(0)
        task = make_task(run.build_model(d.num_classes, d.channels), defender_view(d), discovery,
                         torch.device("cpu"), 0, run.cfg.model, run.cfg.train)
        out = get_method(method)(task, **args)
        return {k: v.detach().clone() for k, v in out.model.state_dict().items()}

    a, b = healed(data), healed(_scrambled(data))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), method
    original = run.build_model(data.num_classes, data.channels).state_dict()
    assert any(not torch.equal(a[k], original[k]) for k in a), method  # the method did change the model


def _export_view(view: TrainingView, paths: tuple[str, ...], src: Path, dst: Path) -> None:
    """The defender's view written as an image folder with the same file names (so the same order)."""
    for i, rel in enumerate(paths):
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(view.images[i].permute(1, 2, 0).numpy()).save(out)
    for f in (src / "test").rglob("*.png"):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(f.read_bytes())


@pytest.mark.slow  # trains a clean-label model (seconds), then one unlearn.py run and one heal
def test_heal_and_unlearn_give_the_same_weights_on_the_same_files(tiny: TinyRun, tmp_path: Path) -> None:
    """unlearn.py's benchmark view, written out as the files a practitioner would hold, healed with
    ``potion.heal`` and the same discovered list: the same healed weights, bit for bit.

    A clean-label attack keeps every poisoned file in its own class folder, so the written folder lists the
    files in the training run's order (a dirty-label file would move to the target's folder and reorder the set).
    """
    from potion.pipelines.heal import heal
    from potion.pipelines.train import run_training
    from potion.pipelines.unlearn import run_unlearning

    trained = run_training(compose_config("train", train_overrides(tiny.data, tmp_path / "run", "poison=sig",
                                                                   "poison.count=16", "logger=none")))
    run = load_trained_run(Path(trained["run_dir"]))
    data = poison(load_data(run.cfg.dataset), run.plan)
    view = defender_view(data)
    folder = tmp_path / "poisoned_files"
    _export_view(view, data.bundle.train.paths, tiny.data, folder)
    discovery = discover(run.plan, share=0.25, seed=0)
    listed = tmp_path / "discovered.txt"
    listed.write_text("\n".join(data.bundle.train.paths[i] for i in discovery.forget_idx.tolist()) + "\n")

    s = run_unlearning(compose_config("unlearn", [f"train_run={run.path}", "logger=none", f"out_dir={tmp_path / 'u'}",
                                                  "method=potion", "discovery.share=0.25", "suspects.enabled=false"]))
    mean, std = list(data.bundle.mean), list(data.bundle.std)
    h = heal(compose_config("heal", [
        f"checkpoint={run.path / 'model.safetensors'}", f"discovered={listed}", "dataset=imagefolder",
        f"dataset.path={folder}", f"dataset.mean={mean}", f"dataset.std={std}", "model=small_cnn", "model.width=8",
        "method=potion", "suspects.enabled=false", "logger=none", f"out_dir={tmp_path / 'h'}"]))
    assert s["attack_target"] == h["attack_target"] == run.plan.target and h["attack_mapping"] == "all_to_one"
    a = load_tensors(Path(s["run_dir"]) / "model.safetensors")
    b = load_tensors(h["healed_weights"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    original = load_tensors(run.path / "model.safetensors")
    assert any(not torch.equal(a[k], original[k]) for k in a)  # healing changed the model
