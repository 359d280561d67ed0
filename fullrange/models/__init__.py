"""Models: spiking ResNet students, ANN ResNet teachers (torchvision key names), a registry."""
from fullrange.models.registry import MODEL_NAMES, NEURON_KEYS, build_model, is_spiking
from fullrange.models.resnet import (ResNet, resnet18, resnet18_cifar, resnet34, resnet34_cifar,
                                     resnet_tiny)
from fullrange.models.spiking_preact_resnet import SpikingPreActResNet, spiking_preact_resnet34
from fullrange.models.spiking_resnet import (SpikingResNet, spiking_resnet18_cifar,
                                             spiking_resnet19_cifar, spiking_resnet_tiny)

__all__ = ["MODEL_NAMES", "NEURON_KEYS", "build_model", "is_spiking", "ResNet", "resnet18",
           "resnet34", "resnet18_cifar", "resnet34_cifar", "resnet_tiny", "SpikingResNet",
           "SpikingPreActResNet", "spiking_resnet18_cifar", "spiking_resnet19_cifar",
           "spiking_resnet_tiny", "spiking_preact_resnet34"]
