"""Building blocks shared by the spiking students.

Students run convolutions and BatchNorm on time-merged tensors [T*B, C, H, W] (t-major: row
t*B + b holds sample b at step t). Every LIF sees the same memory viewed as [T, B, ...].
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from fullrange.models.memory import SpikeConv2d
from fullrange.neuron import LIF, resolve_backend


class MergedLIF(LIF):
    """LIF applied to a time-merged tensor: x[T*B, ...] -> spikes[T*B, ...] (same layout).

    The tensor is viewed as [T, B, ...] (no copy for contiguous or channels_last inputs).
    """

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:  # type: ignore[override]
        if x.shape[0] % T:
            raise ValueError(f"MergedLIF: leading dim {x.shape[0]} is not a multiple of T={T}")
        B = x.shape[0] // T
        if x.dim() == 4 and not x.is_contiguous() and \
                x.is_contiguous(memory_format=torch.channels_last):
            xp = x.permute(0, 2, 3, 1)  # contiguous NHWC view; LIF is elementwise
            out = super().forward(xp.view(T, B, *xp.shape[1:]))
            return out.view(xp.shape).permute(0, 3, 1, 2)
        x = x.contiguous()
        return super().forward(x.view(T, B, *x.shape[1:])).view(x.shape)


def _fused_bn_lif(bn: nn.Module, lif: LIF, c: torch.Tensor, residual: Optional[torch.Tensor]):
    """fullrange.kernels.bn_lif_cpu when it serves this call, else None: a training-mode affine
    nn.BatchNorm2d on a float32 channels_last CPU tensor (residual alike), a LIF whose backend
    resolves to the CPU kernel (neuron.resolve_backend), no autocast, eager mode, and one torch thread (the kernel runs on the
    calling thread: with more, ATen's threaded BatchNorm and the LIF kernel are faster; the
    one-thread-per-process layout the CPU launch configs use is where it pays)."""
    if not (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and lif.backend in ("auto", "cpu")
            and torch.get_num_threads() == 1
            and c.device.type == "cpu" and c.dtype == torch.float32 and c.dim() == 4
            and c.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return None
    if residual is not None and not (residual.dtype == c.dtype and residual.shape == c.shape
                                     and residual.is_contiguous(memory_format=torch.channels_last)):
        return None
    if resolve_backend(lif.backend, c) != "cpu":
        return None
    from fullrange.kernels.bn_lif_cpu import bn_lif_cpu

    return bn_lif_cpu


def bn_lif(bn: nn.Module, lif: LIF, c: torch.Tensor, T: int, residual: Optional[torch.Tensor] = None,
           fuse: bool = True) -> torch.Tensor:
    """spikes = lif(bn(c) + residual, T) on a time-merged c [T*B, C, H, W] (residual alike, or
    None). With fuse, where it applies (see _fused_bn_lif; LIF backend auto/cpu) one fused CPU
    kernel runs BatchNorm's statistics, its apply, the add and the LIF, and keeps only c (and
    residual) for the backward; otherwise the modules run one after another."""
    fused = _fused_bn_lif(bn, lif, c, residual) if fuse else None
    if fused is not None:
        return fused(c, bn, T, lif.decay, lif.threshold, lif.reset, lif.surrogate_alpha, lif.detach_reset, residual)
    y = bn(c)
    return lif(y if residual is None else y + residual, T)


def encode_direct(x: torch.Tensor, T: Optional[int]) -> Tuple[torch.Tensor, int]:
    """Direct encoding. Image x[B, C, H, W] -> x repeated T times as [T*B, C, H, W].

    Event input x[T, B, C, H, W] is merged as is (T, if given, must equal x.shape[0]).
    """
    if x.dim() == 5:
        if T is not None and T != x.shape[0]:
            raise ValueError(f"event input has {x.shape[0]} timesteps but T={T} was requested")
        T = x.shape[0]
        return x.reshape(T * x.shape[1], *x.shape[2:]), T
    if x.dim() != 4:
        raise ValueError(f"spiking model input must be [B, C, H, W] or [T, B, C, H, W], "
                         f"got shape {tuple(x.shape)}")
    if T is None or isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"spiking model needs an integer number of timesteps T >= 1, got {T!r}")
    B = x.shape[0]
    return x.unsqueeze(0).expand(T, *x.shape).reshape(T * B, *x.shape[1:]), T


def kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs with zero biases, BN weight 1 / bias 0; Linear keeps
    PyTorch's default (torchvision's ResNet init; the official ImageNet student's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(cin: int, cout: int, stride: int = 1, spikes_in: bool = False) -> nn.Conv2d:
    """3x3 conv, no bias; a SpikeConv2d (bit-packable input) when its input is a spike tensor."""
    return (SpikeConv2d if spikes_in else nn.Conv2d)(cin, cout, kernel_size=3, stride=stride, padding=1,
                                                      bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1, spikes_in: bool = False) -> nn.Conv2d:
    return (SpikeConv2d if spikes_in else nn.Conv2d)(cin, cout, kernel_size=1, stride=stride, bias=False)


def downsample(in_planes: int, planes: int, stride: int, spikes_in: bool = False) -> Optional[nn.Sequential]:
    """1x1 conv + BN shortcut when the block changes shape (torchvision keys downsample.0/.1), else None."""
    if stride == 1 and in_planes == planes:
        return None
    return nn.Sequential(conv1x1(in_planes, planes, stride, spikes_in), nn.BatchNorm2d(planes))
