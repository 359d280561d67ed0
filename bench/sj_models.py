"""The benchmark peers: fullrange's students built as a SpikingJelly 2.0 user would build them.

Multi-step SpikingJelly layers (layer.Conv2d / BatchNorm2d / MaxPool2d / AdaptiveAvgPool2d /
Linear with step_mode="m") on time-major [T, B, ...] tensors and neuron.LIFNode(step_mode="m")
with the same LIF (tau = 1 / (1 - decay), decay_input=False, threshold 1, v_reset 0 for the hard
reset or None for the soft one, Sigmoid surrogate with alpha 4); its LIF implementation is the
one SpikingJelly picks on the device (SJ_LIF_CUDA_IMPLEMENTATION on CUDA). Module names are
fullrange's, so `twin.load_state_dict(student.state_dict())` gives the same network
(`parity` checks that). forward(x [B, C, H, W], T) -> logits [T, B, classes], as fullrange's.
"""
from __future__ import annotations

import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from fullrange.models.spiking_preact_resnet import IMAGENET_NEURON
from fullrange.models.spiking_resnet import TINY_STAGES


def lif(decay: float, reset: str) -> neuron.LIFNode:
    return neuron.LIFNode(tau=1.0 / (1.0 - decay), decay_input=False, v_threshold=1.0,
                          v_reset=0.0 if reset == "hard" else None, surrogate_function=surrogate.Sigmoid(alpha=4.0),
                          detach_reset=False, step_mode="m")


def conv(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> layer.Conv2d:
    return layer.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias, step_mode="m")


def bn(c: int) -> layer.BatchNorm2d:
    return layer.BatchNorm2d(c, step_mode="m")


def shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    return None if stride == 1 and cin == cout else nn.Sequential(conv(cin, cout, 1, stride), bn(cout))


class Basic(nn.Module):
    """conv-BN-LIF-conv-BN (+ shortcut) -> LIF on [T, B, C, H, W]."""

    def __init__(self, cin, cout, stride, n):
        super().__init__()
        self.conv1, self.bn1, self.lif1 = conv(cin, cout, 3, stride), bn(cout), lif(*n)
        self.conv2, self.bn2, self.lif2 = conv(cout, cout, 3), bn(cout), lif(*n)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(self.lif1(self.bn1(self.conv1(x)))))
        return self.lif2(out + (x if self.downsample is None else self.downsample(x)))


class PreAct(nn.Module):
    """LIF-conv-BN-LIF-conv-BN + identity/downsample on the real-valued stream."""

    def __init__(self, cin, cout, stride, n):
        super().__init__()
        self.lif1, self.conv1, self.bn1 = lif(*n), conv(cin, cout, 3, stride), bn(cout)
        self.lif2, self.conv2, self.bn2 = lif(*n), conv(cout, cout, 3), bn(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(self.lif2(self.bn1(self.conv1(self.lif1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class SJResNet(nn.Module):
    def __init__(self, block, stages, widths, strides, num_classes, in_channels, stem, n, preact=False, hidden=None):
        super().__init__()
        if preact:
            self.conv1, self.bn1 = conv(in_channels, stem, 7, 2, bias=True), bn(stem)
            self.maxpool = layer.MaxPool2d(3, 2, 1, step_mode="m")
        else:
            self.conv1, self.bn1, self.lif1 = conv(in_channels, stem, 3), bn(stem), lif(*n)
        cin = stem
        for i, (k, w, s) in enumerate(zip(stages, widths, strides)):
            blocks = []
            for j in range(k):
                blocks.append(block(cin, w, s if j == 0 else 1, n))
                cin = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = layer.AdaptiveAvgPool2d(1, step_mode="m")
        self.head_fc = nn.Linear(cin, hidden) if hidden else None
        self.head_lif = lif(*n) if hidden else None
        self.fc = nn.Linear(hidden or cin, num_classes)
        self.preact, self.num_stages = preact, len(stages)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        functional.reset_net(self)
        x = x.unsqueeze(0).repeat(T, 1, 1, 1, 1)
        x = self.maxpool(self.bn1(self.conv1(x))) if self.preact else self.lif1(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x).flatten(2)
        if self.head_fc is not None:
            x = self.head_lif(self.head_fc(x))
        return self.fc(x)


def sj_twin(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The SpikingJelly build of fullrange model `name` (tiny, ResNet-19 or preact ResNet-34)."""
    hard = (0.5, "hard")
    if name == "spiking_resnet_tiny":
        t = TINY_STAGES
        return SJResNet(Basic, t["stage_blocks"], t["widths"], t["strides"], num_classes, in_channels,
                        t["stem_channels"], hard)
    if name == "spiking_resnet19_cifar":
        return SJResNet(Basic, (3, 3, 2), (128, 256, 512), (1, 2, 2), num_classes, in_channels, 128, hard,
                        hidden=256)
    if name == "spiking_preact_resnet34":
        soft = (IMAGENET_NEURON["decay"], IMAGENET_NEURON["reset"])
        return SJResNet(PreAct, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), num_classes, in_channels, 64,
                        soft, preact=True)
    raise ValueError(f"no SpikingJelly twin for {name!r}")


@torch.no_grad()
def parity(ours: nn.Module, twin: nn.Module, x: torch.Tensor, T: int) -> float:
    """Max |logit difference| in eval mode with the same weights (spike flips from rounding aside)."""
    twin.load_state_dict(ours.state_dict())
    ours.eval(), twin.eval()
    diff = (ours(x, T) - twin(x, T)).abs().max().item()
    ours.train(), twin.train()
    return diff
