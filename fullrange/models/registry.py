"""Model registry: build_model(name, num_classes, in_channels, neuron) for students and teachers."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from fullrange.models.resnet import resnet18, resnet18_cifar, resnet34, resnet34_cifar, resnet_tiny
from fullrange.models.spiking_preact_resnet import spiking_preact_resnet34
from fullrange.models.spiking_resnet import (spiking_resnet18_cifar, spiking_resnet19_cifar,
                                             spiking_resnet_tiny)

NEURON_KEYS = ("decay", "threshold", "reset", "surrogate_alpha", "detach_reset", "backend")

_SPIKING: Dict[str, Callable[..., nn.Module]] = {
    "spiking_resnet18_cifar": spiking_resnet18_cifar,
    "spiking_resnet19_cifar": spiking_resnet19_cifar,
    "spiking_resnet_tiny": spiking_resnet_tiny,
    "spiking_preact_resnet34": spiking_preact_resnet34,
}
_ANN: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet18_cifar": resnet18_cifar,
    "resnet34_cifar": resnet34_cifar,
    "resnet_tiny": resnet_tiny,
}
MODEL_NAMES = tuple(_SPIKING) + tuple(_ANN)


def _check_name(name: str) -> None:
    if name not in _SPIKING and name not in _ANN:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")


def is_spiking(name: str) -> bool:
    """True for students (forward(x, T) -> [T, B, C]), False for ANN teachers (forward(x))."""
    _check_name(name)
    return name in _SPIKING


def build_model(name: str, num_classes: int, in_channels: int = 3,
                neuron: Optional[dict] = None) -> nn.Module:
    """Build a registered model with fresh weights.

    neuron: LIF keyword arguments (decay, threshold, reset, surrogate_alpha, detach_reset,
    backend) shared by all neurons of a spiking model; ignored for ANNs. Missing keys keep the
    model's default (LIF defaults; spiking_preact_resnet34 defaults to decay 0.2, soft reset).
    """
    _check_name(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"build_model({name!r}): {key} must be a positive int, got {value!r}")
    if name in _ANN:
        return _ANN[name](num_classes=num_classes, in_channels=in_channels)
    neuron = dict(neuron or {})
    unknown = sorted(set(neuron) - set(NEURON_KEYS))
    if unknown:
        raise ValueError(f"build_model({name!r}): unknown neuron keys {unknown}; "
                         f"expected some of {list(NEURON_KEYS)}")
    return _SPIKING[name](num_classes=num_classes, in_channels=in_channels, neuron=neuron)
