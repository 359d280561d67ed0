"""The input gradient of a 2-d convolution from dL/dy and the weight alone (no input tensor).

A 1x1 convolution with stride s > 1 reads only the input pixels on the stride's grid, so its
input gradient is a pointwise (GEMM) map of dL/dy scattered onto that grid, zero elsewhere. On
the CPU, mkldnn's backward-data for this case was measured 3.7-6x slower than that on the demo
student's downsample shapes (2 threads: [512, 16, 28, 28] 6.1 -> 1.0 ms, [512, 16, 14, 14]
0.61 -> 0.19 ms; ResNet-19's [96, 128, 32, 32]: 17.9 -> 17.6 ms) with identical values: each
input-gradient element is one dot product either way. Every other convolution, and every
device but the CPU, runs aten.convolution_backward. add_conv_input_grad adds a conv's input
gradient into one that already holds another's (two convs reading one input): a strided 1x1
conv adds onto its grid alone, without an input-sized zeroed tensor and a sum.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pointwise_strided(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], groups: int) -> bool:
    """Whether a conv with this weight [Cout, Cin, kh, kw] is 1x1, unpadded, ungrouped and strided."""
    return tuple(weight.shape[2:]) == (1, 1) and tuple(padding) == (0, 0) and groups == 1 and tuple(stride) != (1, 1)


def conv_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, shape: Sequence[int], strides: Sequence[int],
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """dL/dx [N, Cin, H, W] of conv2d(x, weight) from dL/dy [N, Cout, H', W'], laid out with the
    given strides (x's: channels_last stays channels_last), in grad_out's dtype.

    A pointwise strided conv on the CPU: dL/dy mapped by weight^T ([Cin, Cout] per pixel) onto
    the stride's grid of a zeroed tensor. Otherwise aten.convolution_backward, whose input
    gradient reads only x's shape and layout: it gets an unwritten tensor of that layout
    (torch.empty_strided: on the CPU its pages are never touched; an expanded 1-element
    tensor, as torch.nn.grad.conv2d_input uses, sends mkldnn to a path measured 1.6-4x slower
    with 1-3 input-sized scratch buffers)."""
    if grad_out.device.type == "cpu" and pointwise_strided(weight, stride, padding, groups):
        grad_x = torch.empty_strided(shape, strides, dtype=grad_out.dtype, device=grad_out.device).zero_()
        grad_x[:, :, ::stride[0], ::stride[1]] = _on_grid(grad_out, weight)
        return grad_x
    stand_in = torch.empty_strided(shape, strides, dtype=grad_out.dtype, device=grad_out.device)
    return torch.ops.aten.convolution_backward(grad_out, stand_in, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0, 0], groups, [True, False, False])[0]


def add_conv_input_grad(grad_x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """grad_x += dL/dx of conv2d(x, weight) from dL/dy (conv_input_grad's values, added in
    grad_x's dtype); in place, returns grad_x [N, Cin, H, W]. A pointwise strided conv on the
    CPU adds onto the stride's grid only: the same sums as adding its full zero-padded gradient."""
    if grad_out.device.type == "cpu" and pointwise_strided(weight, stride, padding, groups):
        grad_x[:, :, ::stride[0], ::stride[1]].add_(_on_grid(grad_out, weight))
        return grad_x
    return grad_x.add_(conv_input_grad(grad_out, weight, grad_x.shape, grad_x.stride(), stride, padding, dilation,
                                       groups))


def _on_grid(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A pointwise conv's input gradient at the stride's grid points: dL/dy [N, Cout, H', W']
    mapped by weight^T -> [N, Cin, H', W']."""
    return F.conv2d(grad_out, weight.transpose(0, 1))
