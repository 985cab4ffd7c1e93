"""SSD dampening, the percentile rule and the ratio pool (method.md §4), on hand-set importances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from potion.core.errors import ConfigError
from potion.unlearning.dampening import RatioPool, dampen_, percentile_for_share, snapshot


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():  # fixed, non-zero, mixed-sign values
        for i, p in enumerate(model.parameters()):
            n = p.numel()
            vals = (torch.arange(n, dtype=torch.float32) + 1 + i) * 0.1
            signs = torch.tensor([1.0 if k % 2 == 0 else -1.0 for k in range(n)])
            p.copy_((vals * signs).view_as(p))
    return model


def _hand_importances() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    r = {"0.weight": torch.ones(3, 4), "0.bias": torch.tensor([0.0, 0.0, 1.0]),
         "1.weight": torch.ones(2, 3), "1.bias": torch.tensor([2.0, 2.0])}
    f = {k: v.clone() for k, v in r.items()}
    f["0.weight"][0, 0] = 20.0  # ratio 20
    f["0.weight"][1, 2] = 4.0  # ratio 4
    f["0.weight"][2, 3] = 10.0  # ratio exactly 10: not selected at alpha 10 (strict >)
    f["0.bias"] = torch.tensor([3.0, 0.0, 0.0])  # r=0,f>0 (inf) | r=0,f=0 (nan) | r=1,f=0 (0)
    f["1.bias"] = torch.tensor([50.0, 1.0])  # ratios 25 and 0.5
    return r, f


def test_selected_parameters_scaled_others_bit_identical() -> None:
    model = _model()
    orig = snapshot(model)
    r, f = _hand_importances()
    res = dampen_(model, orig, r, f, alpha=10.0, lam=1.0)
    p = dict(model.named_parameters())
    expected_changed = {("0.weight", (0, 0)): 1 / 20, ("0.bias", (0,)): 0.0, ("1.bias", (0,)): 2 / 50}
    for name, o in orig.items():
        for idx in np.ndindex(*o.shape):
            got, want = p[name][idx].item(), o[idx].item()
            if (name, idx) in expected_changed:
                assert got == pytest.approx(want * expected_changed[(name, idx)], rel=1e-6), (name, idx)
            else:
                assert got == want, (name, idx)  # bit-identical
    assert p["0.bias"][0].item() == 0.0  # r == 0 and f > 0: zeroed
    assert p["0.bias"][1].item() == orig["0.bias"][1].item()  # 0 / 0: unchanged
    assert res.selected == 3 and res.total == 23
    assert res.share == pytest.approx(3 / 23)


def test_lambda_caps_the_factor_at_one() -> None:
    model = _model()
    orig = snapshot(model)
    r, f = _hand_importances()
    # alpha 1: 0.weight[0,0] (ratio 20), [1,2] (ratio 4), [2,3] (ratio 10), 0.bias[0], 1.bias[0] selected.
    # lam 8: factors min(8/20, 1) = 0.4, min(8/4, 1) = 1, min(8/10, 1) = 0.8, 0, min(16/50, 1) = 0.32
    res = dampen_(model, orig, r, f, alpha=1.0, lam=8.0)
    p = dict(model.named_parameters())
    assert res.selected == 5
    assert p["0.weight"][0, 0].item() == pytest.approx(orig["0.weight"][0, 0].item() * 0.4, rel=1e-6)
    assert p["0.weight"][1, 2].item() == orig["0.weight"][1, 2].item()
    assert p["0.weight"][2, 3].item() == pytest.approx(orig["0.weight"][2, 3].item() * 0.8, rel=1e-6)
    assert p["0.bias"][0].item() == 0.0
    assert p["1.bias"][0].item() == pytest.approx(orig["1.bias"][0].item() * 0.32, rel=1e-6)


def test_never_enlarges_any_parameter_random_draws() -> None:
    gen = torch.Generator().manual_seed(1234)
    for _ in range(20):
        model = _model()
        orig = snapshot(model)
        r, f = {}, {}
        for name, o in orig.items():
            rr = torch.rand(o.shape, generator=gen) * 10 ** float(torch.randint(-3, 3, (1,), generator=gen))
            ff = torch.rand(o.shape, generator=gen) * 10 ** float(torch.randint(-3, 3, (1,), generator=gen))
            rr[torch.rand(o.shape, generator=gen) < 0.2] = 0.0  # some zero importances (0/0 and x/0)
            ff[torch.rand(o.shape, generator=gen) < 0.2] = 0.0
            r[name], f[name] = rr, ff
        alpha = float(torch.rand(1, generator=gen)) * 5
        lam = 0.1 + float(torch.rand(1, generator=gen)) * 10
        dampen_(model, orig, r, f, alpha=alpha, lam=lam)
        for name, p in model.named_parameters():
            assert torch.all(p.abs() <= orig[name].abs()), name
            assert torch.all(p * orig[name] >= 0), name  # never flips a sign
            assert torch.isfinite(p).all(), name
            untouched = ~(f[name] > alpha * r[name])
            assert torch.equal(p[untouched], orig[name][untouched]), name


def test_alpha_above_every_ratio_changes_nothing() -> None:
    model = _model()
    orig = snapshot(model)
    r, f = _hand_importances()
    r["0.bias"] = torch.tensor([1.0, 1.0, 1.0])  # no x/0 entries left: every ratio finite, largest 25
    res = dampen_(model, orig, r, f, alpha=26.0)
    assert res.selected == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, orig[name])


def test_zero_retain_importance_is_zeroed_at_any_alpha() -> None:
    model = _model()
    orig = snapshot(model)
    r, f = _hand_importances()
    res = dampen_(model, orig, r, f, alpha=1e30)
    assert res.selected == 1
    assert model[0].bias[0].item() == 0.0


def test_repeated_dampening_does_not_accumulate() -> None:
    r, f = _hand_importances()
    model = _model()
    orig = snapshot(model)
    dampen_(model, orig, r, f, alpha=1.0)  # selects ratio 4 and 10 entries too
    assert model[0].weight[1, 2].item() != orig["0.weight"][1, 2].item()
    dampen_(model, orig, r, f, alpha=10.0)
    fresh = _model()
    dampen_(fresh, snapshot(fresh), r, f, alpha=10.0)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert model[0].weight[1, 2].item() == orig["0.weight"][1, 2].item()  # reset to the original


@pytest.mark.parametrize(("alpha", "lam"), [(-1.0, 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, -2.0)])
def test_dampen_rejects_bad_hyperparameters(alpha: float, lam: float) -> None:
    model = _model()
    r, f = _hand_importances()
    with pytest.raises(ConfigError):
        dampen_(model, snapshot(model), r, f, alpha=alpha, lam=lam)


def test_percentile_for_share() -> None:
    assert percentile_for_share(0.01) == pytest.approx(100 - math.log(2))
    assert percentile_for_share(0.0) == 100.0
    assert percentile_for_share(1.0) == pytest.approx(100 - math.log(101))
    assert percentile_for_share((math.e - 1) / 100) == pytest.approx(99.0)
    assert percentile_for_share(1e44) == 0.0  # clamped
    with pytest.raises(ConfigError):
        percentile_for_share(-0.1)


def test_ratio_pool_drops_nan_and_inf() -> None:
    r = {"a": torch.tensor([1.0, 2.0, 0.0, 0.0, 4.0]), "b": torch.tensor([[5.0]])}
    f = {"a": torch.tensor([3.0, 1.0, 0.0, 5.0, 2.0]), "b": torch.tensor([[1.0]])}
    pool = RatioPool.build(r, f)
    assert pool.sorted_ratios.tolist() == pytest.approx([0.2, 0.5, 0.5, 3.0])


def test_ratio_pool_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 101):
        values = rng.lognormal(size=n).astype(np.float32)
        r = {"x": torch.ones(n)}
        f = {"x": torch.from_numpy(values.copy())}
        pool = RatioPool.build(r, f)
        for p in (0.0, 12.5, 33.3, 50.0, 90.0, 99.0, 99.9, 100.0):
            assert pool.percentile(p) == pytest.approx(float(np.percentile(values.astype(np.float64), p)),
                                                       rel=1e-6), (n, p)
    assert pool.percentile(-5.0) == pytest.approx(float(values.min()))
    assert pool.percentile(500.0) == pytest.approx(float(values.max()))
    assert RatioPool(torch.empty(0)).percentile(50.0) == math.inf


def test_percentile_rule_selects_the_expected_share() -> None:
    model = nn.Linear(99, 10)  # 990 weights + 10 biases = 1000 parameters
    orig = snapshot(model)
    ratios = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).float() + 1  # permutation of 1..1000
    r = {"weight": torch.ones(10, 99), "bias": torch.ones(10)}
    f = {"weight": ratios[:990].view(10, 99), "bias": ratios[990:]}
    pool = RatioPool.build(r, f)
    alpha = pool.percentile(99.0)  # position 0.99 * 999 = 989.01 between 990 and 991
    assert alpha == pytest.approx(990.01, abs=1e-3)
    res = dampen_(model, orig, r, f, alpha=alpha)
    assert res.selected == 10
    assert res.share == pytest.approx(0.01, abs=1e-3)
    changed = torch.cat([(model.weight != orig["weight"]).flatten(), (model.bias != orig["bias"]).flatten()])
    top = ratios > 990
    assert torch.equal(changed, top & (torch.cat([orig["weight"].flatten(), orig["bias"].flatten()]) != 0))
    got = torch.cat([model.weight.detach().flatten(), model.bias.detach().flatten()])
    want = torch.cat([orig["weight"].flatten(), orig["bias"].flatten()]) * torch.where(top, 1 / ratios, 1.0)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # the same alpha through the share formula: s = (e - 1) / 100 gives p = 99
    assert pool.percentile(percentile_for_share((math.e - 1) / 100)) == pytest.approx(alpha, rel=1e-5)
