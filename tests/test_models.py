"""The model registry: shapes, parameter counts and configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from potion.core.errors import ConfigError
from potion.models import build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _out(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    return model.eval()(torch.randn(*shape))


def test_resnet9_full_width_shape_and_size() -> None:
    model = build_model("resnet9", num_classes=10, in_channels=3, width=1.0)
    assert _out(model, (2, 3, 32, 32)).shape == (2, 10)
    n = _n_params(model)
    assert 2.2e6 < n < 2.4e6
    # by hand: convs 1728 + 204800 + 2*147456 + 294912 + 2*589824 + 294912, linear 1280, BN 2*1344
    assert n == 2_274_880


def test_resnet9_quarter_width() -> None:
    model = build_model("resnet9", num_classes=10, in_channels=3, width=0.25)
    assert _out(model, (2, 3, 32, 32)).shape == (2, 10)
    # channels 16 / 32 / 64: convs 432 + 12800 + 2*9216 + 18432 + 2*36864 + 18432, linear 320, BN 2*336
    assert _n_params(model) == 143_248
    assert model.classifier.bias is None  # linear without bias (method.md §2)


def test_resnet9_grayscale() -> None:
    model = build_model("resnet9", num_classes=10, in_channels=1, width=0.25)
    assert _out(model, (2, 1, 32, 32)).shape == (2, 10)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


@pytest.mark.parametrize("width", [0, 0.0, -1, -0.25])
def test_resnet9_width_must_be_positive(width: float) -> None:
    with pytest.raises(ConfigError, match="model.width"):
        build_model("resnet9", num_classes=10, in_channels=3, width=width)


def test_small_cnn_width_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="model.width"):
        build_model("small_cnn", num_classes=10, in_channels=1, width=0)


def test_wrn_small_shape() -> None:
    model = build_model("wrn", num_classes=100, in_channels=3, depth=10, widen_factor=2)
    assert _out(model, (2, 3, 32, 32)).shape == (2, 100)
    assert model.fc.in_features == 64 * 2
    # the registry's wrn28x10 alias builds the same class
    alias = build_model("wrn28x10", num_classes=100, in_channels=3, depth=10, widen_factor=2)
    assert type(alias) is type(model) and _n_params(alias) == _n_params(model)


@pytest.mark.parametrize("depth", [4, 12, 27])
def test_wrn_bad_depth(depth: int) -> None:
    with pytest.raises(ConfigError, match="model.depth"):
        build_model("wrn", num_classes=100, in_channels=3, depth=depth, widen_factor=2)


def test_wrn_bad_widen_factor() -> None:
    with pytest.raises(ConfigError, match="model.widen_factor"):
        build_model("wrn", num_classes=100, in_channels=3, depth=10, widen_factor=0)


def test_small_cnn_grayscale_16px() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    assert _out(model, (2, 1, 16, 16)).shape == (2, 10)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("nope", num_classes=10, in_channels=3)
    msg = str(info.value)
    assert "model.name=nope" in msg
    for choice in ("resnet9", "small_cnn", "wrn", "torchvision:"):
        assert choice in msg


@pytest.mark.slow  # builds torchvision models
def test_torchvision_model() -> None:
    model = build_model("torchvision:resnet18", num_classes=7, in_channels=3)
    assert model.fc.out_features == 7
    assert _out(model, (2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_errors() -> None:
    with pytest.raises(ConfigError, match="unknown torchvision model"):
        build_model("torchvision:not_a_model", num_classes=7, in_channels=3)
    with pytest.raises(ConfigError, match="3 input channels"):
        build_model("torchvision:resnet18", num_classes=7, in_channels=1)


def test_resnet9_celu_is_the_same_function_with_and_without_gradients() -> None:
    """Without gradients ResNet-9's CELU takes a faster path on CPU than torch's (expm1 runs without SIMD); it must
    be the same function: against torch's CELU and the formula by hand, and the same logits either way."""
    from potion.models.resnet9 import CELU

    act = CELU(alpha=0.075)
    x = torch.tensor([-3.0, -0.075, -1e-4, 0.0, 1e-4, 2.5])
    with torch.no_grad():
        fast = act(x)
    by_hand = torch.where(x > 0, x, 0.075 * (torch.exp(x / 0.075) - 1))
    assert torch.allclose(fast, by_hand, atol=1e-7) and torch.allclose(fast, nn.functional.celu(x, 0.075), atol=1e-7)
    assert torch.equal(act(x.clone().requires_grad_(True)), nn.functional.celu(x, 0.075))  # training: torch's own
    model = build_model("resnet9", num_classes=10, in_channels=3, width=0.25).eval()
    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = model(batch)
    assert torch.allclose(evaluated, model(batch).detach(), atol=1e-5)
