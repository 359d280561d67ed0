"""ANN ResNet teachers (BasicBlock) with torchvision state_dict key names.

Keys: conv1, bn1, layerK.J.{conv1,bn1,conv2,bn2}, layerK.J.downsample.{0,1}, fc, so a torchvision
or timm ResNet-18/34 weight file loads with load_state_dict (torchvision is not a dependency).
forward(x[B, C, H, W]) -> logits[B, num_classes].

    resnet18 / resnet34              ImageNet stem: conv7x7/2 -> BN -> ReLU -> maxpool 3x3/2
    resnet18_cifar / resnet34_cifar  CIFAR stem: conv3x3/1 -> BN -> ReLU, no max-pool
    resnet_tiny                      28x28 grey, the shape of spiking_resnet_tiny with ReLU
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fullrange.models.layers import conv3x3, downsample, kaiming_init
from fullrange.models.spiking_resnet import TINY_STAGES


class BasicBlock(nn.Module):
    """torchvision BasicBlock: conv-BN-ReLU-conv-BN + identity/downsample -> ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """BasicBlock ResNet.

    Args:
        stage_blocks / widths / strides: per stage (strides default 1, 2, 2, ...).
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
        stem_channels: stem width (default widths[0]).
    """

    def __init__(self, stage_blocks: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, stem: str = "imagenet",
                 stem_channels: Optional[int] = None,
                 strides: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(stage_blocks) != len(widths):
            raise ValueError(f"stage_blocks {tuple(stage_blocks)} and widths {tuple(widths)} "
                             "must have the same length")
        strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(widths) - 1)
        stem_channels = stem_channels or widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_channels, kernel_size=7, stride=2,
                                   padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, stem_channels)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        in_planes = stem_channels
        self.num_stages = len(widths)
        for i, (n, w, s) in enumerate(zip(stage_blocks, widths, strides)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, s if j == 0 else 1))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_WIDTHS = (64, 128, 256, 512)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), _WIDTHS, num_classes, in_channels, stem="imagenet")


def resnet34(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    return ResNet((3, 4, 6, 3), _WIDTHS, num_classes, in_channels, stem="imagenet")


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), _WIDTHS, num_classes, in_channels, stem="cifar")


def resnet34_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet((3, 4, 6, 3), _WIDTHS, num_classes, in_channels, stem="cifar")


def resnet_tiny(num_classes: int = 10, in_channels: int = 1) -> ResNet:
    """Tiny ANN ResNet for 28x28 grey images, same shape as spiking_resnet_tiny."""
    return ResNet(num_classes=num_classes, in_channels=in_channels, stem="cifar", **TINY_STAGES)
