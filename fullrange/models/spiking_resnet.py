"""CIFAR-style spiking ResNets (students): ResNet-18, ResNet-19 and a tiny one for 28x28 grey.

    stem: conv3x3 -> BN -> LIF
    BasicBlock: conv3x3 -> BN -> LIF -> conv3x3 -> BN, + shortcut (1x1 conv + BN when the shape
                changes, else identity) -> LIF
    head: global average pool -> [Linear -> LIF] -> Linear

forward(x[B, C, H, W], T) -> logits[T, B, num_classes]. Direct encoding: the image is repeated T
times and every conv/BN runs on [T*B, C, H, W]; each LIF sees [T, B, ...]. Module names follow
torchvision (conv1, bn1, layerK.J.conv1, layerK.J.downsample.0/.1, fc) so ANN weights can seed a
student. In eval mode the network is causal in time: logits at step t depend on steps <= t only.
Init as the official CIFAR code: PyTorch's defaults (Kaiming-uniform convs and Linears, BN weight 1
/ bias 0); fullrange.models.official loads the official checkpoints.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from fullrange.models.layers import (GlobalAvgPool, MergedLIF, NeuronUnits, conv3x3, downsample, encode_direct,
                                     stem_runs_once)
from fullrange.models.memory import SpikeLinear, spike_convs


class SpikingBasicBlock(NeuronUnits):
    """conv-BN-LIF-conv-BN (+ shortcut) -> LIF on [T*B, C, H, W]; spikes in, spikes out."""

    def __init__(self, in_planes: int, planes: int, stride: int, neuron: dict) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride, spikes_in=True)
        self.bn1 = nn.BatchNorm2d(planes)
        self.lif1 = MergedLIF(**neuron)
        self.conv2 = conv3x3(planes, planes, spikes_in=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(in_planes, planes, stride, spikes_in=True)
        self.lif2 = MergedLIF(**neuron)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        if self.downsample is None:  # identity shortcut: x is a spike tensor
            out = self.neuron_unit(self.bn1, self.lif1, self.conv1(x), T)
            return self.neuron_unit(self.bn2, self.lif2, self.conv2(out), T, x)
        conv_d, bn_d = self.downsample
        c1, c_d = spike_convs(x, (self.conv1, conv_d))  # x's gradient built in one tensor
        out = self.neuron_unit(self.bn1, self.lif1, c1, T)
        return self.neuron_unit(self.bn2, self.lif2, self.conv2(out), T, c_d, bn_d)


class SpikingResNet(NeuronUnits):
    """Generic CIFAR-style spiking ResNet (3x3 stride-1 stem, no max-pool). With `stem_once`
    (model.stem_once, the default) the stem conv and BN run once per image (layers.stem_runs_once).

    Args:
        stage_blocks: blocks per stage, e.g. (2, 2, 2, 2).
        widths: output channels per stage.
        strides: stride of the first block of each stage (default 1, 2, 2, ...).
        stem_channels: channels of the stem conv.
        hidden: width of an optional hidden head Linear -> LIF before the classifier.
        neuron: LIF keyword arguments (decay, threshold, reset, surrogate_alpha, detach_reset,
            backend), shared by every neuron.
    """

    stem_once = True

    def __init__(self, stage_blocks: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, stem_channels: int = 64,
                 strides: Optional[Sequence[int]] = None, hidden: Optional[int] = None,
                 neuron: Optional[dict] = None) -> None:
        super().__init__()
        if len(stage_blocks) != len(widths):
            raise ValueError(f"stage_blocks {tuple(stage_blocks)} and widths {tuple(widths)} "
                             "must have the same length")
        strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(widths) - 1)
        if len(strides) != len(widths):
            raise ValueError(f"strides {strides} must have one entry per stage ({len(widths)})")
        neuron = dict(neuron or {})
        self.conv1 = conv3x3(in_channels, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.lif1 = MergedLIF(**neuron)
        in_planes = stem_channels
        self.num_stages = len(widths)
        for i, (n, w, s) in enumerate(zip(stage_blocks, widths, strides)):
            blocks = []
            for j in range(n):
                blocks.append(SpikingBasicBlock(in_planes, w, s if j == 0 else 1, neuron))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = GlobalAvgPool()
        if hidden:
            self.head_fc = nn.Linear(in_planes, hidden)
            self.head_lif = MergedLIF(**neuron)
            in_planes = hidden
        else:
            self.head_fc, self.head_lif = None, None
        self.fc = (SpikeLinear if hidden else nn.Linear)(in_planes, num_classes)

    def _stem(self, x: torch.Tensor, T: int, once: bool) -> torch.Tensor:
        """x[T*B, C, H, W], or the image x[B, C, H, W] when the stem runs once -> spikes[T*B, ...]."""
        if once:
            return self.time_invariant_unit(self.bn1, self.lif1, self.conv1(x), T, made_by=(self.conv1, x))
        return self.neuron_unit(self.bn1, self.lif1, self.conv1(x), T)

    def forward(self, x: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
        """x[B, C, H, W] (or events [T, B, C, H, W]) -> logits[T, B, num_classes]."""
        once = stem_runs_once(self, x)
        x, T = encode_direct(x, T, repeat=not once)
        x = self.segment(partial(self._stem, T=T, once=once), (x,), (self.conv1, self.bn1), (False,))
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block.segment(partial(block, T=T), (x,), (block,), (True,))
        x = torch.flatten(self.avgpool(x), 1)
        if self.head_fc is not None:
            x = self.head_lif(self.head_fc(x), T)
        x = self.fc(x)
        return x.view(T, -1, x.shape[-1])


def spiking_resnet18_cifar(num_classes: int = 10, in_channels: int = 3,
                           neuron: Optional[dict] = None) -> SpikingResNet:
    """CIFAR ResNet-18: stem 64, widths 64/128/256/512, stages [2,2,2,2], GAP, Linear."""
    return SpikingResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels,
                         stem_channels=64, neuron=neuron)


def spiking_resnet19_cifar(num_classes: int = 10, in_channels: int = 3,
                           neuron: Optional[dict] = None) -> SpikingResNet:
    """ResNet-19: stem 128, widths 128/256/512, stages [3,3,2], head Linear(512,256)-LIF-Linear."""
    return SpikingResNet((3, 3, 2), (128, 256, 512), num_classes, in_channels,
                         stem_channels=128, hidden=256, neuron=neuron)


TINY_STAGES = dict(stage_blocks=(1, 1, 1), widths=(16, 32, 64), strides=(2, 2, 1),
                   stem_channels=16)
"""Shape of the tiny ResNets (spiking and ANN) for 28x28 grey images: stem 16 ch at 28x28, one
block per stage, widths 16/32/64 at 14x14/7x7/7x7. About 4.6 MMAC per image per timestep."""


def spiking_resnet_tiny(num_classes: int = 10, in_channels: int = 1,
                        neuron: Optional[dict] = None) -> SpikingResNet:
    """Tiny spiking ResNet for 28x28 grey images (fast on 2 CPU cores); see TINY_STAGES."""
    return SpikingResNet(num_classes=num_classes, in_channels=in_channels, neuron=neuron,
                         **TINY_STAGES)
