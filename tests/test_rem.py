"""REM (method=rem) on a tiny backdoored model: heals, keeps clean accuracy, returns the original architecture."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_world import defender_task, pattern

from potion.core.errors import ConfigError
from potion.data.discovery import discover
from potion.data.poison import TriggerSpec, make_poison_plan
from potion.data.poisoned import poison
from potion.data.sources import DatasetBundle, ImageSplit
from potion.evaluation.backdoor import evaluate_backdoor
from potion.models.resnet9 import ResNet9
from potion.models.side_paths import AddedUnits, Redirection, Tap, choose_taps
from potion.models.small_cnn import SmallCNN
from potion.unlearning.registry import get_method
from potion.unlearning.rem import MaskBank, build_run, rem_settings
from potion.unlearning.task import UnlearnTask
from potion.unlearning.training_based import seeded

TRAIN_CFG = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False, "batch_size": 16,
             "warmup": 0.0, "crop_padding": 1, "flip": False, "epochs": 1}
TARGET = 0
DATA: list = []  # the poisoned data of the module's task: its plan is for evaluation only


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy machine extra threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _split(n: int, rng: np.random.Generator) -> ImageSplit:
    labels = [i % 4 for i in range(n)]
    return ImageSplit(torch.tensor(np.stack([pattern(c, rng) for c in labels])), torch.tensor(labels))


@pytest.fixture(scope="module")
def untrained() -> UnlearnTask:
    """Patterns of 4 classes, a 3x3 patch on 16 of the 320 training images (target 0), half of them discovered."""
    rng = np.random.default_rng(0)
    train = _split(320, rng)
    pixels = train.images.float() / 255
    bundle = DatasetBundle("patterns", train, _split(200, rng), ("a", "b", "c", "d"),
                           tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist()), "patterns")
    plan = make_poison_plan(bundle.train.labels, target=TARGET, num_classes=4, trigger=TriggerSpec(size=3), seed=0,
                            count=16)
    torch.manual_seed(0)
    DATA.append(poison(bundle, plan))
    return defender_task(SmallCNN(num_classes=4, in_channels=3, width=8).eval(), DATA[-1],
                         discover(plan, share=0.5, seed=0), seed=0, train_cfg=dict(TRAIN_CFG))


@pytest.fixture(scope="module")
def poisoned(untrained: UnlearnTask) -> UnlearnTask:
    """The SmallCNN trained on the poisoned patterns: it learned the backdoor.

    Trained to near-certainty on the poison (small batches, learning rate decayed to 0, as the pipeline trains).
    """
    model = copy.deepcopy(untrained.model)
    task = replace(untrained, model=model, train_cfg=dict(TRAIN_CFG))
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=8 * 20)
    model.train()
    for epoch in range(8):
        for x, y in task.batches(torch.arange(320), 16, shuffle=True, augment=True, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    return task


@pytest.fixture()
def task(poisoned: UnlearnTask) -> UnlearnTask:
    return replace(poisoned, model=copy.deepcopy(poisoned.model), train_cfg=dict(poisoned.train_cfg))


def _backdoor(task: UnlearnTask, model: torch.nn.Module) -> dict[str, float]:
    data = DATA[-1]  # the plan: evaluation only
    test = data.bundle.test
    return evaluate_backdoor(model, test.images, test.labels, data.normalizer, data.trigger, TARGET)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # trains the tiny model, then runs REM
def test_rem_removes_the_backdoor_keeps_clean_accuracy_and_drops_the_added_units(task: UnlearnTask,
                                                                                  method_args: Callable) -> None:
    before, original = _backdoor(task, task.model), _state(task.model)
    assert before["asr"] >= 0.9 and before["clean_acc"] >= 0.95 and task.forget_accuracy(task.model) == 1.0
    out = get_method("rem")(task, **method_args("rem", epochs=3))
    after = _backdoor(task, out.model)
    # the original architecture, nothing attached: the added units and their hooks are gone
    assert type(out.model) is SmallCNN and out.model is not task.model
    assert {k: v.shape for k, v in out.model.state_dict().items()} == {k: v.shape for k, v in original.items()}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in out.model.modules())
    assert not out.model.training and all(p.requires_grad for p in out.model.parameters())
    assert all(torch.equal(v, original[k]) for k, v in task.model.state_dict().items()), "poisoned model changed"
    # healed: the trigger mostly fails, the discovered samples lost their poisoned label, clean accuracy kept
    # (measured: asr 1.00 -> 0.01, triggered accuracy 0.25 -> 0.99, clean 1.00 -> 1.00, forget accuracy 1 -> 0)
    assert after["asr"] <= 0.25 and after["poison_acc"] >= 0.75, (before, after)
    assert task.forget_accuracy(out.model) <= 0.2
    assert after["clean_acc"] >= before["clean_acc"] - 0.05, (before, after)
    d = out.diagnostics
    assert d["taps"] == 3 and d["added_params"] > 0 and d["flush_passes_first_epoch"] >= 1
    assert d["redirect_steps"] == 3 * 20 and 1 <= d["selected_epoch"] <= 3 and d["selected_forget_acc"] <= 0.2


@pytest.mark.slow  # trains the tiny model, then runs REM
def test_removal_passes_keep_the_batch_norm_statistics(task: UnlearnTask) -> None:
    """Batches of discovered samples only must not rewrite the running statistics (nor normalise by themselves).

    With batch norm in train mode there, 100 NPO passes do not get this confidently poisoned model's accuracy on
    the discovered samples down to the threshold (on a model trained by train.py, REM then healed nothing).
    """
    s = rem_settings(task, epochs=1, lr=0.005, momentum=0.9, weight_decay=5e-4, batch_size=None, beta=1.0,
                     threshold=0.2, max_flush=100, width=1.0, mask_share=0.2, taps=4, tap_modules=None,
                     augment=True, select="proxy")
    with seeded(task):
        run, _, _ = build_run(task, s)
        stats = {k: v.clone() for k, v in run.model.state_dict().items() if "running" in k}
        passes, steps = run.flush(seed=1)
    assert 1 <= passes < 100 and steps == passes and task.forget_accuracy(run.model) <= 0.2
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in stats.items())


@pytest.mark.slow  # trains the tiny model, then runs REM
def test_rem_is_deterministic_on_cpu(task: UnlearnTask, method_args: Callable) -> None:
    a = get_method("rem")(task, **method_args("rem", epochs=1, select="last")).model
    b = get_method("rem")(task, **method_args("rem", epochs=1, select="last")).model
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_added_units_act_only_in_redirect_mode_and_leave_no_trace() -> None:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, in_channels=3, width=4).eval()
    x = torch.randn(3, 3, 8, 8)
    taps = choose_taps(model, x, 2, None)
    units = torch.nn.ModuleList([AddedUnits(t, 5) for t in taps])
    plain = model(x)
    channel = Redirection(model, taps, units)
    assert torch.equal(model(x), plain)  # drop mode: exactly the original network
    with channel.on([torch.ones(3, 5) for _ in taps]):
        assert not torch.allclose(model(x), plain)
    assert torch.equal(model(x), plain)
    channel.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_discovered_samples_share_one_mask_and_the_others_draw_their_own() -> None:
    bank = MaskBank([64, 32], num_train=1000, forget_idx=torch.tensor([3, 500, 999]), share=0.2, seed=1,
                    device=torch.device("cpu"))
    forget = bank.masks(torch.tensor([3, 500, 999]))
    assert all(torch.equal(m[0], m[1]) and torch.equal(m[0], m[2]) for m in forget)
    others = bank.masks(torch.arange(0, 1000, 7))
    assert 0.15 < float(others[0].mean()) < 0.25
    assert len({tuple(row.tolist()) for row in others[0]}) == others[0].shape[0]
    assert torch.equal(bank.masks(torch.tensor([4]))[1], bank.masks(torch.tensor([4]))[1])  # fixed per sample


def test_taps_on_resnet9_are_the_papers_four_stage_outputs() -> None:
    model = ResNet9(num_classes=10, width=0.25)
    taps = choose_taps(model, torch.randn(2, 3, 32, 32), 4, None)
    assert [t.name for t in taps] == ["features.0.2", "features.2", "features.5", "features.6.2"]
    assert [t.channels for t in taps] == [16, 32, 64, 32]
    named = choose_taps(model, torch.randn(2, 3, 32, 32), 4, ("features.8",))
    assert named == [Tap("features.8", (32,))]


# What only the model can tell; the schema checks the other values (tests/test_config_values.py).
@pytest.mark.parametrize(("args", "message"), [
    ({"tap_modules": ["features.99"]}, r"^method\.tap_modules: 'features\.99' is not a module of the model"),
    ({"tap_modules": ["features.2", "features.2"]}, r"^method\.tap_modules: a module is named twice"),
])
def test_bad_arguments_are_one_line_config_errors(untrained: UnlearnTask, args: dict, message: str,
                                                  method_args: Callable) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        get_method("rem")(untrained, **method_args("rem", epochs=1, **args))
    assert "\n" not in str(err.value)
