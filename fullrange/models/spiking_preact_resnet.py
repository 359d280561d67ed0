"""ImageNet pre-activation spiking ResNet-34 (student), the official architecture.

    stem:  conv7x7/2 (with bias) -> BN -> maxpool 3x3/2          (no neuron in the stem)
    block: LIF -> conv3x3 -> BN -> LIF -> conv3x3 -> BN, + identity or downsample(x)
           (downsample = 1x1 conv + BN applied to the real-valued block input)
    head:  global average pool -> fc, on the real-valued residual stream (no neuron)

Neurons sit only at the entry of each conv branch; the residual stream between blocks, and what
the classifier reads, stay real-valued (PAPER.md). forward(x[B, 3, H, W], T) -> logits[T, B,
num_classes]; causal in time in eval mode. Init as the official code: Kaiming-normal (fan_out)
convs, BN weight 1 / bias 0, PyTorch's default Linear. The official block convs carry biases that
each feed a BatchNorm, where they cancel in training; here they are left out, and
fullrange.models.official folds them into the BN's running_mean when it loads an official
checkpoint. Default neuron: decay 0.2, soft reset (the ImageNet recipe); `neuron` keys override it.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from fullrange.models.layers import (GlobalAvgPool, MergedLIF, NeuronUnits, batch_norm_over_time, conv3x3, downsample,
                                     encode_direct, kaiming_init, repeat_time, stem_runs_once)
from fullrange.models.memory import MemoryModes

IMAGENET_NEURON = {"decay": 0.2, "reset": "soft"}


class SpikingPreActBlock(NeuronUnits):
    """LIF-conv-BN-LIF-conv-BN + identity/downsample on [T*B, C, H, W] (real-valued stream)."""

    def __init__(self, in_planes: int, planes: int, stride: int, neuron: dict) -> None:
        super().__init__()
        self.lif1 = MergedLIF(**neuron)
        self.conv1 = conv3x3(in_planes, planes, stride, spikes_in=True)
        self.bn1 = nn.BatchNorm2d(planes)
        self.lif2 = MergedLIF(**neuron)
        self.conv2 = conv3x3(planes, planes, spikes_in=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(in_planes, planes, stride)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        c1 = self.conv1(self.lif1(x, T))
        out = self.neuron_unit(self.bn1, self.lif2, c1, T)
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class SpikingPreActResNet(MemoryModes):
    """Pre-activation spiking ResNet with the ImageNet stem (7x7/2 conv + max-pool). With
    `stem_once` (model.stem_once, the default) the stem runs once per image and its output is
    repeated over T (layers.stem_runs_once)."""

    stem_once = True

    def __init__(self, stage_blocks: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, neuron: Optional[dict] = None) -> None:
        super().__init__()
        neuron = {**IMAGENET_NEURON, **(neuron or {})}
        stem = widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = stem
        self.num_stages = len(widths)
        for i, (n, w) in enumerate(zip(stage_blocks, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(SpikingPreActBlock(in_planes, w, stride, neuron))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def _stem(self, x: torch.Tensor, T: int, once: bool) -> torch.Tensor:
        """x[T*B, C, H, W], or the image x[B, C, H, W] when the stem runs once -> [T*B, C', H', W']."""
        if once:
            return repeat_time(self.maxpool(batch_norm_over_time(self.bn1, self.conv1(x), T)), T)
        return self.maxpool(self.bn1(self.conv1(x)))

    def forward(self, x: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
        """x[B, C, H, W] (or events [T, B, C, H, W]) -> logits[T, B, num_classes]."""
        once = stem_runs_once(self, x)
        x, T = encode_direct(x, T, repeat=not once)
        x = self.segment(partial(self._stem, T=T, once=once), (x,), (self.conv1, self.bn1), (False,))
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block.segment(partial(block, T=T), (x,), (block,), (False,))
        x = self.fc(torch.flatten(self.avgpool(x), 1))
        return x.view(T, -1, x.shape[-1])


def spiking_preact_resnet34(num_classes: int = 1000, in_channels: int = 3,
                            neuron: Optional[dict] = None) -> SpikingPreActResNet:
    """Pre-activation spiking ResNet-34: stages [3,4,6,3], widths 64/128/256/512."""
    return SpikingPreActResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, in_channels,
                               neuron=neuron)
