"""The training-based baselines on a tiny hand-made task (random 1x8x8 images, 4 classes, a 4-wide CNN)."""

from __future__ import annotations

import copy

import pytest
import torch

from potion.data.poison import TriggerSpec, make_poison_plan
from potion.data.poisoned import poison
from potion.data.sources import DatasetBundle, ImageSplit
from potion.discovery import discover
from potion.errors import ConfigError
from potion.models.small_cnn import SmallCNN
from potion.unlearning.registry import get_method
from potion.unlearning.task import UnlearnTask
from potion.unlearning.training_based import last_layers, parameterised_layers

TRAIN_CFG = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "batch_size": 32,
             "warmup": 0.01, "crop_padding": 1, "flip": False, "iterations": None, "epochs": 1,
             "label_smoothing": 0}
METHODS = ("retrain", "eu_k", "finetune", "scrub", "bad_teacher")
FAST = {"retrain": {"iterations": 3}, "eu_k": {"iterations": 3}, "finetune": {"iterations": 3},
        "scrub": {"iterations": 4, "max_steps": 2}, "bad_teacher": {"iterations": 3}}


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
    return UnlearnTask(model=model, data=poison(bundle, plan), discovery=discover(plan, share=0.5, seed=0),
                       device=torch.device("cpu"), seed=0, model_factory=_factory, train_cfg=dict(TRAIN_CFG))


@pytest.fixture()
def task(base: UnlearnTask) -> UnlearnTask:
    """A fresh task per test whose model is a private copy (methods must not touch it anyway)."""
    return UnlearnTask(model=copy.deepcopy(base.model), data=base.data, discovery=base.discovery,
                       device=base.device, seed=base.seed, model_factory=base.model_factory,
                       train_cfg=dict(base.train_cfg))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_returns_a_normal_trained_model(task: UnlearnTask, name: str) -> None:
    before = _state(task.model)
    out = get_method(name)(task, **FAST[name])
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
    out = get_method("retrain")(task, iterations=5)
    assert len(seen) == 5 and out.diagnostics["retain_steps"] == 5
    seen.clear()
    # default: train.epochs (1) passes over the retain set (190 samples, batch 32 -> 6 steps)
    out = get_method("retrain")(task)
    assert len(seen) == 6 and out.diagnostics["iterations"] == 6
    seen.clear()
    out = get_method("retrain")(task, iterations=2, extra_forget=task.retain_idx[:10].tolist())
    assert out.diagnostics["retain_samples"] == task.retain_idx.numel() - 10


def test_retrain_differs_from_the_poisoned_model(task: UnlearnTask) -> None:
    out = get_method("retrain")(task, iterations=2)
    p0 = dict(task.model.named_parameters())
    assert any(not torch.equal(p, p0[n]) for n, p in out.model.named_parameters())


def test_finetune_last_layer_only(task: UnlearnTask) -> None:
    before = _state(task.model)
    out = get_method("finetune")(task, k=1, iterations=3)
    assert _changed(before, out.model) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("k", [1, 2])
def test_eu_k_changes_only_the_last_k_layers(task: UnlearnTask, k: int) -> None:
    before = _state(task.model)
    names = [n for n, _ in last_layers(task.model, k)]
    out = get_method("eu_k")(task, k=k, iterations=2)
    changed = _changed(before, out.model)
    assert changed and all(any(c.startswith(n + ".") for n in names) for c in changed)
    assert len(parameterised_layers(task.model)) == 7  # 3 x (conv, bn) + linear


@pytest.mark.parametrize("name", ["scrub", "bad_teacher", "eu_k"])
def test_deterministic_given_the_seed(task: UnlearnTask, name: str) -> None:
    a = get_method(name)(task, **FAST[name]).model.state_dict()
    b = get_method(name)(task, **FAST[name]).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    task.seed = 1
    c = get_method(name)(task, **FAST[name]).model.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(("name", "args", "match"), [
    ("retrain", {"iterations": -1}, "method.iterations"),
    ("retrain", {"extra_forget": [10_000]}, "extra_forget"),
    ("eu_k", {"k": 0}, "method.k"),
    ("eu_k", {"k": -1}, "method.k"),
    ("eu_k", {"k": 99}, "only 7"),
    ("finetune", {"k": 0}, "method.k"),
    ("finetune", {"iterations": 0}, "method.iterations"),
    ("finetune", {"lr": -0.1}, "method.lr"),
    ("finetune", {"schedule": "cosine"}, "method.schedule"),
    ("scrub", {"max_steps": 500}, "method.max_steps"),
    ("scrub", {"temperature": 0}, "method.temperature"),
    ("bad_teacher", {"forget_share": 1.5}, "method.forget_share"),
    ("bad_teacher", {"bogus": 1}, "unknown argument"),
])
def test_invalid_arguments_raise_config_error(task: UnlearnTask, name: str, args: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_method(name)(task, **args)

