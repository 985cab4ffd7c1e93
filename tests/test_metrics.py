"""Metric formulas of method.md §3 against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from potion.evaluation.metrics import acc_drop, accuracy, attack_success_rate, finite_or_none, healed


def test_accuracy_hand_computed() -> None:
    preds = torch.tensor([0, 1, 2, 3, 4])
    labels = torch.tensor([0, 1, 0, 3, 0])
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    # shapes [N, 1] and [N] are compared element by element, not broadcast to N x N
    assert accuracy(preds.view(-1, 1), labels) == pytest.approx(3 / 5)


def test_accuracy_extremes_and_empty() -> None:
    labels = torch.tensor([2, 2, 1])
    assert accuracy(labels.clone(), labels) == 1.0
    assert accuracy(torch.tensor([0, 0, 0]), labels) == 0.0
    assert math.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_asr_counts_only_non_target_true_classes() -> None:
    target = 0
    true = torch.tensor([0, 0, 1, 2, 3, 4])
    # the two true-target samples are predicted as the target: they must NOT count.
    # among the 4 non-target samples, 1 and 3 are predicted as the target -> 2 / 4
    preds = torch.tensor([0, 0, 0, 2, 0, 4])
    assert attack_success_rate(preds, true, target) == pytest.approx(0.5)
    # same predictions with the true-target samples predicted otherwise: still 0.5
    preds2 = torch.tensor([5, 6, 0, 2, 0, 4])
    assert attack_success_rate(preds2, true, target) == pytest.approx(0.5)


def test_asr_other_target_and_nan_when_no_eligible_sample() -> None:
    true = torch.tensor([3, 3, 1, 2])
    preds = torch.tensor([3, 3, 3, 3])
    assert attack_success_rate(preds, true, 3) == pytest.approx(1.0)  # 2 of 2 non-target samples
    assert attack_success_rate(torch.tensor([1, 2, 1, 2]), true, 3) == 0.0
    assert math.isnan(attack_success_rate(torch.tensor([3, 3]), torch.tensor([3, 3]), 3))


def test_healed_hand_computed() -> None:
    # gap 0.9 - 0.1 = 0.8; closed 0.5 - 0.1 = 0.4 -> 50 %
    assert healed(0.5, 0.1, 0.9) == pytest.approx(50.0)
    assert healed(0.9, 0.1, 0.9) == pytest.approx(100.0)
    assert healed(0.1, 0.1, 0.9) == pytest.approx(0.0)
    # unlearning made triggered accuracy worse: negative
    assert healed(0.0, 0.2, 0.6) == pytest.approx(-50.0)
    # better than the clean model was: above 100
    assert healed(0.8, 0.2, 0.6) == pytest.approx(150.0)


def test_healed_nan_without_a_gap() -> None:
    assert math.isnan(healed(0.5, 0.9, 0.9))
    assert math.isnan(healed(0.5, 0.95, 0.9))


def test_acc_drop_in_percentage_points_with_sign() -> None:
    assert acc_drop(0.92, 0.90) == pytest.approx(2.0)
    assert acc_drop(0.90, 0.92) == pytest.approx(-2.0)
    assert acc_drop(0.5, 0.5) == 0.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), None, "0.5"])
def test_finite_or_none_rejects(value: object) -> None:
    assert finite_or_none(value) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.0, -1.5, 3, 1e300])
def test_finite_or_none_keeps(value: float) -> None:
    assert finite_or_none(value) == value


def test_average_precision_hand_computed() -> None:
    from potion.unlearning.suspects import average_precision

    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    truth = torch.tensor([True, False, True, False])
    # precision at the hits: 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision(scores, truth) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores, torch.zeros(4, dtype=torch.bool)) != average_precision(scores, truth)
