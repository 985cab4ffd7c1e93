"""The attack catalogue: each trigger's formula by hand, plans of clean-label / all-to-all / noise-mode attacks,
PGD, the attainable-healing metric, and trigger synthesis at every corner."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from potion.core.errors import ConfigError
from potion.data.adversarial import pgd_away
from potion.data.augment import Normalizer
from potion.data.poison import PoisonPlan, Trigger, TriggerSpec, make_poison_plan
from potion.data.triggers import KINDS
from potion.data.triggers.ftrojan import RGB_TO_YUV, dct_matrix
from potion.evaluation import metrics
from potion.unlearning.attack import infer_attack
from potion.unlearning.ssd_family import grouped_forget_acc, potion_loss, ptn_criterion
from potion.unlearning.synthesis import invert_additive, synthesize_additive, synthesize_forget

MEAN3, STD3 = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _trigger(kind: str, shape: tuple[int, int, int] = (3, 32, 32), **kw) -> Trigger:
    c, h, w = shape
    return Trigger(TriggerSpec.from_config({"kind": kind, **kw}), c, h, w, MEAN3[:1] * c, STD3[:1] * c)


def _pixels_to_norm(p: torch.Tensor) -> torch.Tensor:
    return (p - 0.5) / 0.25


def _norm_to_pixels(x: torch.Tensor) -> torch.Tensor:
    return x * 0.25 + 0.5


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 16, 16), (3, 20, 28)])
def test_every_kind_is_deterministic_keeps_pixels_in_range_and_touches_only_chosen_rows(kind: str, shape: tuple
                                                                                     ) -> None:
    gen = torch.Generator().manual_seed(123)  # not the blend pattern's seed
    x = _pixels_to_norm(torch.rand(3, *shape, generator=gen))
    which = torch.tensor([True, False, True])
    a = _trigger(kind, shape).apply(x, which)
    b = _trigger(kind, shape).apply(x, which)
    assert torch.equal(a, b)
    assert torch.equal(a[1], x[1])
    assert not torch.allclose(a[0], x[0])
    p = _norm_to_pixels(a)
    assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5


def test_sig_adds_the_sinusoid_to_every_row_and_channel() -> None:
    x = torch.zeros(1, 3, 8, 16)  # normalised 0 = pixel 0.5: no clipping for delta 20
    out = _norm_to_pixels(_trigger("sig", (3, 8, 16), delta=20, frequency=2).apply(x))
    j = torch.arange(16, dtype=torch.float32)
    expected = 0.5 + 20 / 255 * torch.sin(2 * math.pi * j * 2 / 16)
    for ch in range(3):
        for row in range(8):
            assert torch.allclose(out[0, ch, row], expected, atol=1e-5)


def test_ftrojan_bumps_exactly_the_chosen_dct_coefficients_of_u_and_v() -> None:
    x = torch.zeros(1, 3, 16, 16)  # mid-grey: the +-30/255 pattern never clips
    out = _norm_to_pixels(_trigger("ftrojan", (3, 16, 16), magnitude=30, frequencies=[[3, 5], [15, 15]]).apply(x))
    diff = out[0] - 0.5
    yuv = torch.einsum("ij,jhw->ihw", RGB_TO_YUV, diff).double()
    d = dct_matrix(16)
    coeff = torch.stack([d @ yuv[c] @ d.T for c in range(3)]) * 255
    assert coeff[0].abs().max() < 1e-3  # luminance untouched
    for c in (1, 2):
        assert coeff[c, 3, 5] == pytest.approx(30, abs=1e-2)
        assert coeff[c, 15, 15] == pytest.approx(30, abs=1e-2)
        rest = coeff[c].clone()
        rest[3, 5] = rest[15, 15] = 0
        assert rest.abs().max() < 1e-2


def test_ftrojan_refuses_a_frequency_outside_the_block() -> None:
    with pytest.raises(ConfigError, match="frequencies"):
        _trigger("ftrojan", (1, 16, 16), frequencies=[[31, 31]])


def test_wanet_warp_is_fixed_and_noise_mode_is_random_per_call() -> None:
    gen = torch.Generator().manual_seed(1)
    x = _pixels_to_norm(torch.rand(2, 3, 16, 16, generator=gen))
    trig = _trigger("wanet", (3, 16, 16), strength=1.0)
    codes = torch.tensor([1, 2], dtype=torch.uint8)
    first, second = trig.apply(x, codes), trig.apply(x, codes)
    assert torch.equal(first[0], second[0])  # the trigger warp is one fixed function
    assert not torch.equal(first[1], second[1])  # noise mode jitters anew
    assert not torch.allclose(first[1], first[0])
    other = _trigger("wanet", (3, 16, 16), strength=1.0, warp_seed=5).apply(x, codes)
    assert not torch.allclose(other[0], first[0])


def test_label_consistent_corners_are_a_checkerboard_of_plus_minus_amplitude() -> None:
    x = torch.zeros(1, 1, 10, 10)
    out = _norm_to_pixels(_trigger("label_consistent", (1, 10, 10), size=3, amplitude=64).apply(x))[0, 0] - 0.5
    a = 64 / 255
    for r0, c0 in ((0, 0), (0, 7), (7, 0), (7, 7)):
        block = out[r0:r0 + 3, c0:c0 + 3]
        assert block[0, 0] == pytest.approx(a, abs=1e-5) and block[0, 1] == pytest.approx(-a, abs=1e-5)
    assert out[3:7, 3:7].abs().max() < 1e-6


def _labels(n_per_class: int = 20, classes: int = 5) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(n_per_class)


def test_clean_label_plan_poisons_only_the_target_class_and_keeps_labels() -> None:
    labels = _labels()
    plan = make_poison_plan(labels, target=2, num_classes=5, trigger=TriggerSpec(kind="sig"), seed=0, count=10)
    assert plan.count == 10 and all(labels[i] == 2 for i in plan.indices)
    assert torch.equal(plan.poisoned_labels(labels), labels)
    with pytest.raises(ConfigError, match="clean-label"):
        make_poison_plan(labels, target=2, num_classes=5, trigger=TriggerSpec(kind="sig"), seed=0, count=21)
    with pytest.raises(ConfigError, match="all_to_all"):
        make_poison_plan(labels, target=2, num_classes=5, trigger=TriggerSpec(kind="label_consistent"), seed=0,
                         count=5, mapping="all_to_all")


def test_all_to_all_maps_each_label_to_the_next_and_asr_counts_the_mapped_label() -> None:
    labels = _labels()
    plan = make_poison_plan(labels, target=0, num_classes=5, trigger=TriggerSpec(), seed=3, count=30,
                            mapping="all_to_all")
    poisoned = plan.poisoned_labels(labels)
    idx = torch.tensor(plan.indices)
    assert torch.equal(poisoned[idx], (labels[idx] + 1) % 5)
    assert PoisonPlan.from_dict(plan.to_dict()) == plan
    true = torch.tensor([0, 1, 2, 3, 4])
    preds = torch.tensor([1, 2, 0, 0, 1])  # the first two follow the mapping (4 -> 0 does not)
    assert metrics.attack_success_rate(preds, true, plan.wanted(true)) == pytest.approx(2 / 5)


def test_wanet_noise_samples_are_disjoint_from_poison_and_sized_by_the_ratio() -> None:
    labels = _labels()
    plan = make_poison_plan(labels, target=0, num_classes=5, trigger=TriggerSpec(kind="wanet", noise_ratio=2.0),
                            seed=0, count=10)
    assert len(plan.noise_indices) == 20 and not set(plan.noise_indices) & set(plan.indices)
    codes = plan.flags()
    assert int((codes == 1).sum()) == 10 and int((codes == 2).sum()) == 20
    assert torch.equal(plan.mask(), codes == 1)


def test_an_old_plan_file_loads_unchanged() -> None:
    old = {"indices": [1, 4], "true_labels": [0, 1], "target": 0, "seed": 0, "num_train": 10, "exclude_target": False,
           "meta": {}, "trigger": {"kind": "patch", "size": 3, "position": "bottom_right", "offset": None,
                                   "value": None, "color": None, "alpha": 0.1, "pattern_seed": 0}}
    assert PoisonPlan.from_dict(old).to_dict() == old


def test_healed_attainable_by_hand() -> None:
    assert metrics.healed_attainable(0.6, 0.2, 0.7) == pytest.approx(80.0)
    assert math.isnan(metrics.healed_attainable(0.6, 0.7, 0.7))


def test_pgd_raises_the_loss_within_the_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    images = torch.randint(30, 220, (16, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 4, (16,))
    norm = Normalizer(MEAN3, STD3)
    out = pgd_away(model, images, labels, norm, eps=8, steps=5, step=2)
    assert out.dtype == torch.uint8 and (out.int() - images.int()).abs().max() <= 8
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(norm(out)), labels) > loss(model(norm(images)), labels)


class CornerBackdoor(nn.Module):
    """A backdoored toy classifier: the target logit fires when a bright k x k patch sits at (r, c)."""

    def __init__(self, r: int, c: int, k: int = 3, classes: int = 4, target: int = 1, hw: int = 12) -> None:
        super().__init__()
        self.r, self.c, self.k, self.target = r, c, k, target
        self.base = nn.Linear(hw * hw, classes)
        torch.manual_seed(0)
        nn.init.normal_(self.base.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = x[:, :, self.r:self.r + self.k, self.c:self.c + self.k].mean((1, 2, 3))
        logits = self.base(x.mean(1).flatten(1))
        bump = torch.zeros_like(logits)
        bump[:, self.target] = 10 * torch.sigmoid(8 * (window - 1.5))
        return logits + bump


@pytest.mark.parametrize(("r", "c"), [(0, 0), (0, 9), (9, 0), (9, 9), (4, 5)])
def test_synthesis_locates_the_patch_at_every_corner(r: int, c: int) -> None:
    gen = torch.Generator().manual_seed(2)
    model = CornerBackdoor(r, c).eval()
    host = torch.randn(1, 1, 12, 12, generator=gen).clamp(-1.5, 1.5)
    host[:, :, r:r + 3, c:c + 3] = 2.1
    probes = torch.randn(64, 1, 12, 12, generator=gen).clamp(-1.5, 1.5)
    found = synthesize_forget(model, host, probes, target=1)
    assert found is not None
    assert (found.row, found.col, found.size) == (r, c, 3)
    assert found.flip_rate == 1.0


class AllToAllCorner(CornerBackdoor):
    """All-to-all: the bright patch sends each input to the class after its own prediction (read outside it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = x[:, :, self.r:self.r + self.k, self.c:self.c + self.k].mean((1, 2, 3))
        host = x.clone()
        host[:, :, self.r:self.r + self.k, self.c:self.c + self.k] = 0.0
        logits = self.base(host.mean(1).flatten(1))
        mapped = (logits.argmax(1) + 1) % logits.shape[1]
        return logits + 10 * torch.sigmoid(12 * (window - 1.8))[:, None] * F.one_hot(mapped, logits.shape[1])


@pytest.mark.parametrize(("r", "c"), [(0, 0), (9, 9), (4, 5)])
def test_all_to_all_synthesis_finds_the_window_and_labels_each_probe_by_its_mapped_prediction(r: int, c: int
                                                                                          ) -> None:
    gen = torch.Generator().manual_seed(3)
    model = AllToAllCorner(r, c).eval()
    host = torch.randn(1, 1, 12, 12, generator=gen).clamp(-1.5, 1.5)
    host[:, :, r:r + 3, c:c + 3] = 2.1
    probes = torch.randn(64, 1, 12, 12, generator=gen).clamp(-1.5, 1.5)
    own = model(probes).argmax(1)
    assert own.unique().numel() > 1  # the probes span several classes: no single target would do
    found = synthesize_forget(model, host, probes, target=None)
    assert found is not None and (found.row, found.col, found.size) == (r, c, 3) and found.flip_rate == 1.0
    assert torch.equal(found.labels, (own + 1) % 4) and found.images.shape == probes.shape


def test_all_to_all_synthesis_finds_nothing_in_a_clean_sample() -> None:
    gen = torch.Generator().manual_seed(3)
    model = AllToAllCorner(4, 5).eval()
    host = torch.randn(1, 1, 12, 12, generator=gen).clamp(-1.5, 1.5)
    assert synthesize_forget(model, host, torch.randn(64, 1, 12, 12, generator=gen).clamp(-1.5, 1.5),
                             target=None) is None


@pytest.mark.parametrize(("labels", "asked", "used"), [([3, 3], "auto", "logit_norm"), ([3, 5], "auto", "ce"),
                                                       ([3, 5], "logit_norm", "logit_norm"), ([3], "ce", "ce")])
def test_potion_follows_the_inferred_mapping_unless_told_otherwise(labels: list[int], asked: str, used: str) -> None:
    task = SimpleNamespace(attack=infer_attack(torch.tensor(labels), None, 10))
    assert potion_loss(task, asked) == used  # type: ignore[arg-type]


@pytest.mark.parametrize(("labels", "declared", "asked", "used"), [
    ([3, 3], None, "auto", "exclude_natural_target"), ([3, 5], None, "auto", "all"),
    ([3], {"clean_label": False}, "auto", "all"), ([3], {"clean_label": True}, "auto", "exclude_natural_target"),
    ([3], None, "all", "all")])
def test_ptn_leaves_natural_target_samples_out_when_the_attack_has_one_target(
        labels: list[int], declared: dict | None, asked: str, used: str) -> None:
    task = SimpleNamespace(attack=infer_attack(torch.tensor(labels), declared, 10))
    assert ptn_criterion(task, asked) == used  # type: ignore[arg-type]


def test_additive_estimate_recovers_an_image_wide_trigger_from_several_samples() -> None:
    gen = torch.Generator().manual_seed(4)
    pattern = 0.8 * torch.sin(torch.arange(12.0)).view(1, 1, 1, 12).expand(1, 1, 12, 12)

    class Detector(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            score = (x * pattern).mean((1, 2, 3)) / (pattern * pattern).mean()
            return torch.stack([torch.zeros_like(score), 10 * (score - 0.5)], 1)

    clean = torch.randn(400, 1, 12, 12, generator=gen) * 0.5
    forget = clean[:40] + pattern
    found = synthesize_additive(Detector(), forget, clean[40:], clean[200:300], target=1)
    assert found is not None and found.additive and found.flip_rate > 0.9
    assert torch.allclose(found.delta, pattern[0], atol=0.3)
    assert synthesize_additive(Detector(), clean[:40], clean[40:], clean[200:300], target=1) is None


class PatternBackdoor(nn.Module):
    """Class 0 by nature; the target 1 when the input carries ``pattern`` (a learned linear read-out)."""

    def __init__(self, pattern: torch.Tensor, backdoor: bool = True) -> None:
        super().__init__()
        self.read = nn.Parameter(pattern.clone() if backdoor else torch.zeros_like(pattern))
        self.norm = float((pattern * pattern).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.read).sum((1, 2, 3)) / self.norm
        return torch.stack([torch.full_like(score, 2.0), 10 * score - 3], 1)


def test_inversion_recovers_an_image_wide_trigger_from_one_sample() -> None:
    gen = torch.Generator().manual_seed(5)
    pattern = 0.3 * torch.sin(torch.arange(12.0)).view(1, 1, 1, 12).expand(1, 1, 12, 12)
    clean = torch.randn(301, 1, 12, 12, generator=gen) * 0.5
    model = PatternBackdoor(pattern).eval()
    one = clean[:1] + pattern  # the single discovered sample: its host image is not known
    assert model(one).argmax(1).item() == 1 and (model(clean[1:]).argmax(1) == 1).float().mean() < 0.1
    before = model.read.detach().clone()
    found = invert_additive(model, one, clean[1:], target=1, steps=60)
    assert found is not None and found.additive and found.flip_rate > 0.9
    assert torch.nn.functional.cosine_similarity(found.delta.flatten(), pattern[0].flatten(), dim=0) > 0.9
    assert found.images.shape == clean[1:].shape and bool((found.labels == 1).all())
    assert model.read.grad is None and torch.equal(model.read, before)  # only the input was optimised


def test_inversion_finds_nothing_without_a_backdoor() -> None:
    gen = torch.Generator().manual_seed(6)
    pattern = 0.3 * torch.sin(torch.arange(12.0)).view(1, 1, 1, 12).expand(1, 1, 12, 12)
    clean = torch.randn(301, 1, 12, 12, generator=gen) * 0.5
    assert invert_additive(PatternBackdoor(pattern, backdoor=False).eval(), clean[:1] + pattern, clean[1:],
                           target=1) is None


def test_ptn_never_stops_while_the_discovered_samples_still_fire() -> None:
    # one discovered sample still at the target, 500 synthetic ones all neutralised: not neutralised
    threshold = 0.1 * grouped_forget_acc([1, 500], [1, 500])
    assert grouped_forget_acc([1, 0], [1, 500]) > threshold
    assert grouped_forget_acc([0, 40], [1, 500]) <= threshold
    assert grouped_forget_acc([0, 51], [1, 500]) > threshold
    # one group: the plain accuracy
    assert grouped_forget_acc([7], [10], total=20) == pytest.approx(7 / 20)
