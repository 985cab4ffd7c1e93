"""The training-based baselines on a tiny hand-made task (random 1x8x8 images, 4 classes, a 4-wide CNN)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import full_method_args
from tiny_world import defender_task

from potion.config.compose import check_node
from potion.config.schema import Method
from potion.core.errors import ConfigError
from potion.data.discovery import discover
from potion.data.poison import TriggerSpec, make_poison_plan
from potion.data.poisoned import poison
from potion.data.sources import DatasetBundle, ImageSplit
from potion.models.small_cnn import SmallCNN
from potion.unlearning.methods import get_method
from potion.unlearning.task import UnlearnTask
from potion.unlearning.training_based import last_layers, parameterised_layers

TRAIN_CFG = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "batch_size": 32,
             "warmup": 0.01, "crop_padding": 1, "flip": False, "iterations": None, "epochs": 1,
             "label_smoothing": 0}
METHODS = ("retrain", "eu_k", "finetune", "scrub", "bad_teacher")
FAST = {"retrain": {"iterations": 3}, "eu_k": {"iterations": 3}, "finetune": {"iterations": 3},
        "scrub": {"iterations": 4, "max_steps": 2}, "bad_teacher": {"iterations": 3}}


def run(task: UnlearnTask, name: str, **changes: object):  # noqa: ANN201
    """Run a method with its YAML arguments, FAST's short schedule and ``changes``."""
    return get_method(name)(task, **full_method_args(name, **{**FAST[name], **changes}))


def _factory() -> SmallCNN:
    return SmallCNN(num_classes=4, in_channels=1, width=4)


@pytest.fixture(scope="module")
def base() -> UnlearnTask:
    gen = torch.Generator().manual_seed(0)
    def split(n: int) -> ImageSplit:
        return ImageSplit(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen),
                          torch.randint(0, 4, (n,), generator=gen))

    bundle = DatasetBundle("tiny", split(200), split(40), ("a", "b", "c", "d"), (0.5,), (0.25,), "tiny-fp")
    plan = make_poison_plan(bundle.train.labels, target=0, num_classes=4, trigger=TriggerSpec(size=2), seed=0,
                            count=20)
    torch.manual_seed(0)
    model = _factory().eval()
    return defender_task(model, poison(bundle, plan), discover(plan, share=0.5, seed=0), seed=0,
                         model_factory=_factory, train_cfg=dict(TRAIN_CFG))


@pytest.fixture()
def task(base: UnlearnTask) -> UnlearnTask:
    """A fresh task per test whose model is a private copy (methods must not touch it anyway)."""
    return replace(base, model=copy.deepcopy(base.model), train_cfg=dict(base.train_cfg))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_returns_a_normal_trained_model(task: UnlearnTask, name: str) -> None:
    before = _state(task.model)
    out = run(task, name)
    assert type(out.model) is SmallCNN and out.model is not task.model
    assert set(out.model.state_dict()) == set(before)
    assert all(torch.isfinite(p).all() for p in out.model.parameters())
    assert all(p.requires_grad for p in out.model.parameters()) and not out.model.training
    assert _changed(before, out.model), "training changed nothing"
    assert not _changed(before, task.model), "the poisoned model must stay untouched"
    assert out.timings["train_seconds"] >= 0 and out.diagnostics["iterations"] >= 1
    assert all(torch.isfinite(torch.tensor(v)) for k, v in out.diagnostics.items() if k.startswith("final_"))


def test_retrain_runs_the_requested_steps_and_the_default_schedule(task: UnlearnTask,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = task.batches

    def counting(*args, **kwargs):
        for batch in original(*args, **kwargs):
            seen.append(batch[0].shape[0])
            yield batch

    monkeypatch.setattr(task, "batches", counting)
    out = run(task, "retrain", iterations=5)
    assert len(seen) == 5 and out.diagnostics["retain_steps"] == 5
    seen.clear()
    # default: train.epochs (1) passes over the retain set (190 samples, batch 32 -> 6 steps)
    out = run(task, "retrain", iterations=None)
    assert len(seen) == 6 and out.diagnostics["iterations"] == 6
    seen.clear()
    out = run(task, "retrain", iterations=2, extra_forget=task.retain_idx[:10].tolist())
    assert out.diagnostics["retain_samples"] == task.retain_idx.numel() - 10


def test_retrain_differs_from_the_poisoned_model(task: UnlearnTask) -> None:
    out = run(task, "retrain", iterations=2)
    p0 = dict(task.model.named_parameters())
    assert any(not torch.equal(p, p0[n]) for n, p in out.model.named_parameters())


def test_finetune_last_layer_only(task: UnlearnTask) -> None:
    before = _state(task.model)
    out = run(task, "finetune", k=1)
    assert _changed(before, out.model) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("k", [1, 2])
def test_eu_k_changes_only_the_last_k_layers(task: UnlearnTask, k: int) -> None:
    before = _state(task.model)
    names = [n for n, _ in last_layers(task.model, k)]
    out = run(task, "eu_k", k=k, iterations=2)
    changed = _changed(before, out.model)
    assert changed and all(any(c.startswith(n + ".") for n in names) for c in changed)
    assert len(parameterised_layers(task.model)) == 7  # 3 x (conv, bn) + linear


@pytest.mark.slow  # nine method runs
@pytest.mark.parametrize("name", ["scrub", "bad_teacher", "eu_k"])
def test_deterministic_given_the_seed(task: UnlearnTask, name: str) -> None:
    a = run(task, name).model.state_dict()
    b = run(task, name).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    task.seed = 1
    c = run(task, name).model.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(("name", "change", "message"), [
    ("retrain", {"iterations": -1}, "method.iterations=-1: must be an integer >= 1 or null"),
    ("eu_k", {"k": 0}, "method.k=0: must be an integer >= 1"),
    ("eu_k", {"k": -1}, "method.k=-1: must be an integer >= 1"),
    ("finetune", {"k": 0}, "method.k=0: must be a positive integer or -1 (all layers)"),
    ("finetune", {"iterations": 0}, "method.iterations=0: must be an integer >= 1"),
    ("finetune", {"lr": -0.1}, "method.lr=-0.1: must be a finite number > 0 or null"),
    ("finetune", {"schedule": "cosine"}, "method.schedule='cosine': must be one of ['linear', 'constant']"),
    ("scrub", {"max_steps": 500}, "method.max_steps=500: at most one max step per min step"),
    ("scrub", {"temperature": 0}, "method.temperature=0: must be a finite number > 0"),
    ("bad_teacher", {"forget_share": 1.5}, "method.forget_share=1.5: must be a finite number > 0 and < 1 or null"),
    ("bad_teacher", {"batch_size": 1}, "method.batch_size=1: must be an integer >= 2 or null"),
    ("bad_teacher", {"bogus": 1}, "method.bogus: unknown key; valid keys: name, lr,"),
    ("retrain", {"extra_forget": [3, -1]}, "method.extra_forget=[3, -1]: must be a list of integers >= 0 or null"),
])
def test_the_schema_checks_the_arguments(name: str, change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_node(Method, {"name": name, **full_method_args(name, **change)}, "method")
    assert str(info.value).startswith(message), info.value


@pytest.mark.parametrize(("name", "change", "train", "message"), [
    ("retrain", {"extra_forget": [10_000]}, {}, r"^method.extra_forget: \[10000\] are not training indices in "
                                                r"\[0, 199\]$"),
    ("eu_k", {"k": 99}, {}, r"^method.k=99: the model has only 7 parameterised layers"),
    ("finetune", {"lr": None}, {"lr": -1}, r"^train.lr=-1: must be a finite number > 0 \(the training run's value, "
                                           r"used where method.lr is null\)$"),
    ("bad_teacher", {}, {"batch_size": 1}, r"^train.batch_size=1 \(of the training run\): bad_teacher needs "),
    ("retrain", {"momentum": 0.0, "nesterov": None}, {"nesterov": True}, r"^method.nesterov=true needs method"),
])
def test_what_needs_the_data_or_the_training_run_is_checked_where_it_is_known(
        task: UnlearnTask, name: str, change: dict, train: dict, message: str) -> None:
    task.train_cfg.update(train)
    with pytest.raises(ConfigError, match=message):
        run(task, name, **change)
