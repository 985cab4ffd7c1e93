"""Model registry: build a classifier by name (ResNet-9, WideResNet, a small CNN, or a torchvision model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from potion.config.compose import check_node
from potion.config.schema import Model
from potion.core.errors import ConfigError
from potion.models.resnet9 import ResNet9
from potion.models.small_cnn import SmallCNN
from potion.models.wide_resnet import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet9": ResNet9,
    "wrn": WideResNet,
    "wrn28x10": WideResNet,
    "small_cnn": SmallCNN,
}


def build_model(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered model, or ``torchvision:<name>`` (e.g. ``torchvision:resnet18``) with fresh weights.

    The name and arguments are checked against the config schema first (also when they come from a run
    folder's config.yaml rather than a composed config).
    """
    check_node(Model, {"name": name, **kwargs}, "model")
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        if tv_name not in torchvision.models.list_models():
            raise ConfigError(f"model.name={name}: unknown torchvision model (see torchvision.models.list_models())")
        if in_channels != 3:
            raise ConfigError(f"model.name={name}: torchvision models expect 3 input channels, data has {in_channels}")
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
