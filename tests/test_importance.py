"""Parameter importances against analytic gradients of a two-layer linear network (method.md §4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from potion.core.errors import ConfigError
from potion.unlearning.importance import compute_importance

W1 = np.array([[1.0, 2.0], [-1.0, 0.5]])
W2 = np.array([[0.5, -1.0], [2.0, 1.0]])
BATCH_A = (np.array([[1.0, 0.0], [0.5, -2.0]]), np.array([0, 1]))
BATCH_B = (np.array([[2.0, 1.0], [-1.0, 3.0], [0.3, 0.7]]), np.array([1, 1, 0]))


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(W1))
        net[1].weight.copy_(torch.from_numpy(W2))
    return net


def _torch_batch(batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(batch[0].copy()), torch.from_numpy(batch[1].copy()).long()


def _dlogits(z: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """dL/dz_i for L = mean_i loss_i, by hand."""
    b = len(z)
    if loss == "logit_sqnorm":  # d ||z||^2 / dz = 2 z
        return 2 * z / b
    if loss == "logit_norm":  # d ||z|| / dz = z / ||z||
        return z / np.linalg.norm(z, axis=1, keepdims=True) / b
    e = np.exp(z - z.max(1, keepdims=True))  # cross-entropy: softmax - one-hot
    return (e / e.sum(1, keepdims=True) - np.eye(z.shape[1])[y]) / b


def _analytic_grads(batch: tuple[np.ndarray, np.ndarray], loss: str) -> dict[str, np.ndarray]:
    x, y = batch
    h = x @ W1.T  # rows h_i = W1 x_i
    z = h @ W2.T  # rows z_i = W2 h_i
    g = _dlogits(z, y, loss)
    return {"1.weight": g.T @ h, "0.weight": (g @ W2).T @ x}  # sum_i g_i h_i^T and sum_i W2^T g_i x_i^T


def _expected(batches: list, loss: str, power: int) -> dict[str, np.ndarray]:
    out = {"0.weight": np.zeros((2, 2)), "1.weight": np.zeros((2, 2))}
    for batch in batches:
        for name, grad in _analytic_grads(batch, loss).items():
            out[name] += np.abs(grad) if power == 1 else grad ** 2
    return {n: v / len(batches) for n, v in out.items()}


@pytest.mark.parametrize(("loss", "power"), [("logit_sqnorm", 1), ("logit_norm", 1), ("ce", 2), ("ce", 1)])
@pytest.mark.parametrize("which", [[BATCH_A], [BATCH_B], [BATCH_A, BATCH_B]])
def test_importance_matches_analytic_gradients(loss: str, power: int, which: list) -> None:
    net = _net()
    imp = compute_importance(net, [_torch_batch(b) for b in which], loss=loss, power=power)
    want = _expected(which, loss, power)
    assert set(imp) == {"0.weight", "1.weight"}
    for name, value in want.items():
        assert imp[name].shape == (2, 2)
        np.testing.assert_allclose(imp[name].double().numpy(), value, rtol=1e-5, atol=1e-9, err_msg=name)


def test_two_batches_give_the_mean_of_the_per_batch_importances() -> None:
    for loss, power in (("logit_norm", 1), ("ce", 2)):
        a = compute_importance(_net(), [_torch_batch(BATCH_A)], loss=loss, power=power)
        b = compute_importance(_net(), [_torch_batch(BATCH_B)], loss=loss, power=power)
        both = compute_importance(_net(), [_torch_batch(BATCH_A), _torch_batch(BATCH_B)], loss=loss, power=power)
        for name in both:
            assert torch.allclose(both[name], (a[name] + b[name]) / 2, rtol=1e-6)
            assert not torch.allclose(both[name], a[name] + b[name], rtol=1e-3)  # not the plain sum


def test_logit_norm_scales_linearly_sqnorm_quadratically() -> None:
    x = np.array([[0.7, -0.4]])
    c = 100.0
    ratios = {}
    for loss in ("logit_norm", "logit_sqnorm"):
        small = compute_importance(_net(), [_torch_batch((x, np.array([0])))], loss=loss, power=1)
        big = compute_importance(_net(), [_torch_batch((c * x, np.array([0])))], loss=loss, power=1)
        ratios[loss] = {n: (big[n] / small[n]).double() for n in small}
    for name in ("0.weight", "1.weight"):
        assert torch.allclose(ratios["logit_norm"][name], torch.full((2, 2), c, dtype=torch.float64), rtol=1e-4)
        assert torch.allclose(ratios["logit_sqnorm"][name], torch.full((2, 2), c * c, dtype=torch.float64),
                              rtol=1e-4)


def test_an_outlier_sample_dominates_sqnorm_but_not_logit_norm() -> None:
    # batch: two ordinary samples + the first one scaled by 100 (a very confident sample)
    x = np.array([[1.0, 0.0], [0.5, -2.0], [100.0, 0.0]])
    y = np.array([0, 0, 0])
    with_outlier = {loss: compute_importance(_net(), [_torch_batch((x, y))], loss=loss, power=1)
                    for loss in ("logit_norm", "logit_sqnorm")}
    outlier_only = {loss: compute_importance(_net(), [_torch_batch((x[2:], y[2:]))], loss=loss, power=1)
                    for loss in ("logit_norm", "logit_sqnorm")}

    # share of the W2 importance explained by the outlier alone (scaled by its 1/B weight in the batch mean)
    def share(loss: str) -> float:
        return float(outlier_only[loss]["1.weight"].sum() / 3 / with_outlier[loss]["1.weight"].sum())

    # the ordinary samples keep > 10x more say under logit_norm (the outlier's weight grows like c, not c^2)
    rest_norm, rest_sq = 1 - share("logit_norm"), 1 - share("logit_sqnorm")
    assert share("logit_sqnorm") > 0.999
    assert rest_norm > 10 * rest_sq


def test_model_mode_is_restored_and_batch_norm_frozen() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), Probe(), nn.Linear(3, 2)).double()
    batches = [_torch_batch(BATCH_A), _torch_batch(BATCH_B)]
    net.train()
    running = net[1].running_mean.clone()
    compute_importance(net, batches, loss="ce", power=2)
    assert seen == [False, False]  # computed in eval mode
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, running)
    assert all(p.grad is None for p in net.parameters())

    net.eval()
    compute_importance(net, batches, loss="logit_norm", power=1)
    assert not net.training and not any(m.training for m in net.modules())


def test_frozen_parameters_are_left_out() -> None:
    net = _net()
    net[0].weight.requires_grad_(False)
    imp = compute_importance(net, [_torch_batch(BATCH_A)], loss="logit_norm", power=1)
    assert set(imp) == {"1.weight"}


@pytest.mark.parametrize(("loss", "power"), [("mse", 1), ("logit_norm", 3), ("ce", 0)])
def test_bad_loss_or_power(loss: str, power: int) -> None:
    with pytest.raises(ConfigError):
        compute_importance(_net(), [_torch_batch(BATCH_A)], loss=loss, power=power)


def test_no_batches() -> None:
    net = _net().train()
    with pytest.raises(ConfigError, match="no batches"):
        compute_importance(net, [], loss="ce", power=2)
    assert net.training
