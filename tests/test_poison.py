"""The poison plan (which samples, how many, which target) and the trigger pasted into normalised batches."""

from __future__ import annotations

import json

import pytest
import torch

from potion.config.compose import check_node
from potion.config.schema import Poison
from potion.core.errors import ConfigError
from potion.data.poison import PoisonPlan, Trigger, TriggerSpec, make_poison_plan

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# max over channels of (1 - mean) / std, by hand:
#   (1 - 0.4914) / 0.2470 = 2.05911, (1 - 0.4822) / 0.2435 = 2.12649, (1 - 0.4465) / 0.2616 = 2.11583
CIFAR_WHITE = 0.5178 / 0.2435


def _labels(n: int = 100, classes: int = 10) -> torch.Tensor:
    return torch.arange(n) % classes


def _plan(labels: torch.Tensor | None = None, **kw: object) -> PoisonPlan:
    args: dict = {"target": 0, "num_classes": 10, "trigger": TriggerSpec(), "seed": 0}
    args.update(kw)
    return make_poison_plan(_labels() if labels is None else labels, **args)


# ------------------------------------------------------------------------------------------- the plan


def test_plan_same_seed_same_indices_other_seed_different() -> None:
    labels = _labels(1000)
    a = _plan(labels, seed=7, count=50)
    b = _plan(labels, seed=7, count=50)
    c = _plan(labels, seed=8, count=50)
    assert a.indices == b.indices
    assert a.indices != c.indices
    assert len(a.indices) == 50 and len(set(a.indices)) == 50
    assert list(a.indices) == sorted(a.indices)
    assert all(0 <= i < 1000 for i in a.indices)
    assert a.true_labels == tuple(int(labels[i]) for i in a.indices)
    assert a.count == 50 and a.num_train == 1000 and a.seed == 7 and a.target == 0


POISON = {"count": None, "fraction": 0.01, "target": 0, "seed": 0, "exclude_target": False, "mapping": "all_to_one",
          "trigger": {"kind": "patch"}}


@pytest.mark.parametrize(("change", "message"), [
    ({"fraction": None}, "poison: set exactly one of poison.count (e.g. 500) or poison.fraction"),
    ({"count": 5}, "poison: set exactly one of poison.count (e.g. 500) or poison.fraction"),
    ({"fraction": 0.0}, "poison.fraction=0.0: must be a finite number > 0 and < 1 or null"),
    ({"fraction": 1.0}, "poison.fraction=1.0: must be a finite number > 0 and < 1 or null"),
    ({"fraction": -0.1}, "poison.fraction=-0.1: must be a finite number > 0 and < 1 or null"),
    ({"count": 0, "fraction": None}, "poison.count=0: must be >= 1"),
    ({"count": -3, "fraction": None}, "poison.count=-3: must be an integer >= 0 or null"),
    ({"target": -1}, "poison.target=-1: must be an integer >= 0"),
    ({"mapping": "some_to_one"}, "poison.mapping='some_to_one': must be one of ['all_to_one', 'all_to_all']"),
])
def test_the_schema_checks_count_fraction_target_and_mapping(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_node(Poison, {**POISON, **change}, "poison")
    assert str(info.value).startswith(message), info.value


def test_the_plan_checks_what_needs_the_data() -> None:
    with pytest.raises(ConfigError, match=r"^poison.count=101: larger than the training set \(100 samples\)$"):
        _plan(count=101)
    with pytest.raises(ConfigError, match=r"^poison.target=10: must be a class index in \[0, 9\]$"):
        _plan(count=5, target=10)


def test_plan_count_equal_to_n_is_allowed() -> None:
    assert _plan(count=100).indices == tuple(range(100))


@pytest.mark.parametrize(("fraction", "expected"), [(0.034, 3), (0.036, 4), (0.05, 5), (0.001, 1)])
def test_plan_count_from_fraction_rounds(fraction: float, expected: int) -> None:
    assert _plan(fraction=fraction).count == expected  # N = 100; at least one sample


def test_plan_exclude_target() -> None:
    labels = _labels(100)  # 10 samples of each class
    plan = _plan(labels, count=90, exclude_target=True, target=3)
    assert plan.exclude_target
    assert 3 not in plan.true_labels
    assert set(plan.indices) == {i for i in range(100) if i % 10 != 3}
    with pytest.raises(ConfigError, match="poison.count"):
        _plan(labels, count=91, exclude_target=True, target=3)
    # without exclusion, target-class images may be drawn (method.md §2)
    assert 3 in _plan(labels, count=100, target=3).true_labels


@pytest.mark.parametrize("target", [10, 11])
def test_plan_target_outside_classes(target: int) -> None:
    with pytest.raises(ConfigError, match="poison.target"):
        _plan(count=5, target=target)


def test_plan_round_trip_through_json() -> None:
    spec = TriggerSpec(kind="patch", size=2, position="top_left", offset=(1, 2), color=(1.0, 0.0, 0.5))
    plan = make_poison_plan(_labels(50, 5), target=4, num_classes=5, trigger=spec, seed=3, count=7)
    plan = PoisonPlan(**{**plan.__dict__, "meta": {"note": "x"}})
    back = PoisonPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    assert back.trigger.offset == (1, 2) and back.trigger.color == (1.0, 0.0, 0.5)
    blend = _plan(count=3, trigger=TriggerSpec(kind="blend", alpha=0.3, pattern_seed=9), exclude_target=True)
    assert PoisonPlan.from_dict(json.loads(json.dumps(blend.to_dict()))) == blend


def test_plan_mask_and_poisoned_labels() -> None:
    labels = torch.tensor([1, 2, 3, 1, 2, 3])
    plan = PoisonPlan(indices=(1, 4), true_labels=(2, 2), target=0, trigger=TriggerSpec(), seed=0, num_train=6)
    assert plan.mask().tolist() == [False, True, False, False, True, False]
    assert plan.mask().dtype == torch.bool
    assert plan.poisoned_labels(labels).tolist() == [1, 0, 3, 1, 0, 3]
    assert labels.tolist() == [1, 2, 3, 1, 2, 3]  # the input is not modified


# ---------------------------------------------------------------------------------------- the trigger


def _batch(shape: tuple[int, ...] = (2, 3, 8, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _region(shape: tuple[int, ...], rows: range, cols: range) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for r in rows:
        for c in cols:
            m[:, :, r, c] = True
    return m


def _trigger(spec: TriggerSpec, shape: tuple[int, ...] = (2, 3, 8, 8)) -> Trigger:
    _, c, h, w = shape
    return Trigger(spec, c, h, w, CIFAR_MEAN[:c], CIFAR_STD[:c])


def test_default_white_value_by_hand() -> None:
    assert CIFAR_WHITE == pytest.approx(2.1265, abs=1e-4)


def test_bottom_right_patch_sets_exactly_nine_pixels_per_channel() -> None:
    x = _batch()
    out = _trigger(TriggerSpec(size=3, position="bottom_right")).apply(x)
    region = _region(x.shape, range(5, 8), range(5, 8))
    assert int(region[0, 0].sum()) == 9
    assert torch.allclose(out[region], torch.full_like(out[region], CIFAR_WHITE), atol=1e-5)
    assert torch.equal(out[~region], x[~region])
    assert out.shape == x.shape


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [
        ("bottom_right", range(3, 6), range(7, 10)),
        ("bottom_left", range(3, 6), range(0, 3)),
        ("top_right", range(0, 3), range(7, 10)),
        ("top_left", range(0, 3), range(0, 3)),
    ],
)
def test_corners_on_a_non_square_image(position: str, rows: range, cols: range) -> None:
    shape = (2, 3, 6, 10)  # height 6, width 10: a swapped row/col would land elsewhere
    x = _batch(shape)
    out = _trigger(TriggerSpec(size=3, position=position, value=7.0), shape).apply(x)
    region = _region(shape, rows, cols)
    assert torch.allclose(out[region], torch.full_like(out[region], 7.0), atol=1e-5)
    assert torch.equal(out[~region], x[~region])


def test_explicit_offset_overrides_position() -> None:
    shape = (2, 3, 6, 10)
    x = _batch(shape)
    out = _trigger(TriggerSpec(size=2, position="top_left", offset=(3, 6), value=-4.0), shape).apply(x)
    region = _region(shape, range(3, 5), range(6, 8))
    assert torch.allclose(out[region], torch.full_like(out[region], -4.0), atol=1e-5)
    assert torch.equal(out[~region], x[~region])


def test_which_applies_only_to_chosen_rows() -> None:
    x = _batch((3, 3, 8, 8))
    trig = _trigger(TriggerSpec(value=5.0), (3, 3, 8, 8))
    out = trig.apply(x, which=torch.tensor([True, False, True]))
    full = trig.apply(x)
    assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2])
    assert torch.equal(out[1], x[1])
    assert not torch.equal(full[1], x[1])


def test_explicit_colour_converts_through_mean_and_std() -> None:
    x = _batch()
    out = _trigger(TriggerSpec(size=3, color=(1.0, 0.0, 0.5))).apply(x)
    expected = [(1.0 - 0.4914) / 0.2470, (0.0 - 0.4822) / 0.2435, (0.5 - 0.4465) / 0.2616]
    for ch, v in enumerate(expected):
        patch = out[:, ch, 5:8, 5:8]
        assert torch.allclose(patch, torch.full_like(patch, v), atol=1e-5), ch
    # a single value is used for every channel, each converted with its own mean/std
    out1 = _trigger(TriggerSpec(size=3, color=(0.0,))).apply(x)
    for ch in range(3):
        assert out1[0, ch, 7, 7].item() == pytest.approx(-CIFAR_MEAN[ch] / CIFAR_STD[ch], abs=1e-5)


def test_blend_formula_and_pattern_seed() -> None:
    alpha = 0.25
    shape = (2, 3, 8, 8)
    trig = _trigger(TriggerSpec(kind="blend", alpha=alpha, pattern_seed=1), shape)
    pattern = trig.apply(torch.zeros(shape))[0] / alpha  # at x = 0 the output is alpha * pattern
    x = _batch(shape)
    out = trig.apply(x)
    assert torch.allclose(out, (1 - alpha) * x + alpha * pattern, atol=1e-5)
    # the pattern is an image of pixels in [0, 1], normalised, and not constant
    pixels = pattern * torch.tensor(CIFAR_STD).view(3, 1, 1) + torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.std() > 0.1
    same = _trigger(TriggerSpec(kind="blend", alpha=alpha, pattern_seed=1), shape).apply(x)
    other = _trigger(TriggerSpec(kind="blend", alpha=alpha, pattern_seed=2), shape).apply(x)
    assert torch.equal(same, out)
    assert not torch.allclose(other, out)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (TriggerSpec(size=9), "poison.trigger.size"),
        (TriggerSpec(size=0), "poison.trigger.size"),
        (TriggerSpec(size=3, offset=(6, 0)), "poison.trigger.offset"),
        (TriggerSpec(size=3, offset=(0, -1)), "poison.trigger.offset"),
        (TriggerSpec(kind="checkerboard"), "poison.trigger.kind"),
        (TriggerSpec(position="middle"), "poison.trigger.position"),
        (TriggerSpec(kind="blend", alpha=0.0), "poison.trigger.alpha"),
        (TriggerSpec(kind="blend", alpha=1.5), "poison.trigger.alpha"),
        (TriggerSpec(color=(1.2, 0.0, 0.0)), "poison.trigger.color"),
        (TriggerSpec(color=(1.0, 0.0)), "poison.trigger.color"),
    ],
)
def test_trigger_validation_names_the_key(spec: TriggerSpec, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _trigger(spec)


def test_trigger_spec_from_config() -> None:
    spec = TriggerSpec.from_config({"kind": "patch", "size": 4, "position": "top_left", "offset": [1, 2],
                                    "value": None, "color": 0.5})
    assert spec == TriggerSpec(size=4, position="top_left", offset=(1, 2), color=(0.5,))
