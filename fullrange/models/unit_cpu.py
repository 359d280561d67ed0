"""A neuron unit, BatchNorm (+ residual) -> LIF, as one fused CPU op (fullrange.kernels.bn_lif_cpu).

    spikes = lif(bn(c) [+ residual | + residual_bn(residual)], T)

for channels_last float32/float64 tensors [T*B, C, H, W] in training mode. Autograd keeps c and
the residual (a spike residual bit-packed when `pack`); neither bn's output nor the LIF's input
is ever written. The statistics come from ATen (aten.batch_norm_update_stats: the module's
own kernel, which also updates the running statistics), so the spikes, the running statistics
and num_batches_tracked are those of the modules bit for bit; gradients agree to rounding
(float64 sums; tests/test_bn_lif_cpu.py). layers.NeuronUnits.neuron_unit uses it in every memory
mode where it serves (`serves`); model.fuse_bn_lif: false runs the modules instead. End to end
it is as fast as the modules on the 2-core CPU; it is kept for the memory (BENCHMARKS.md).
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fullrange.models.memory import _packed_once, is_nhwc, unpack_spikes
from fullrange.neuron import resolve_backend

_CHECKS: dict = {}  # dtype -> None (the fused op computes BatchNorm's output as ATen does) or why not


def serves(c: torch.Tensor, bn: nn.Module, lif: nn.Module, residual: Optional[torch.Tensor],
           residual_bn: Optional[nn.Module]) -> bool:
    """Whether FusedUnitCPU runs this unit: eager autograd on the CPU without autocast, c and the
    residual channels_last float32/float64 of one shape, training-mode affine nn.BatchNorm2d
    with running statistics, a LIF on the CPU kernel, and the first-use check passed."""
    if c.device.type != "cpu":
        return False
    from fullrange.kernels.lif_cpu import _eager  # a plain tensor outside torch.compile / torch.func

    if not (_eager(c) and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and c.dtype in (torch.float32, torch.float64) and is_nhwc(c)):
        return False
    if residual is not None and not (residual.shape == c.shape and residual.dtype == c.dtype and is_nhwc(residual)):
        return False
    bns = (bn,) if residual_bn is None else (bn, residual_bn)
    if not all(type(m) is nn.BatchNorm2d and m.training and m.affine and m.track_running_stats for m in bns):
        return False
    return resolve_backend(lif.backend, c) == "cpu" and _unusable(c.dtype) is None


def reads_pixel_broadcast_grad(spikes: torch.Tensor) -> bool:
    """Whether spikes came from FusedUnitCPU, whose backward reads a gradient that is the same at
    every pixel of an image (expanded over H and W: a global average pool's) without spreading it
    out in memory."""
    return type(spikes.grad_fn) is FusedUnitCPU._backward_cls


def _unusable(dtype: torch.dtype) -> Optional[str]:
    """Why the fused op cannot run dtype here, or None: checked once per dtype on a small batch,
    BatchNorm's output and statistics against aten.native_batch_norm (ATen's rounding depends on
    how torch was compiled; where it differs the modules run, with a warning)."""
    if dtype not in _CHECKS:
        try:
            _CHECKS[dtype] = _check(dtype)
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or run: the modules run
            _CHECKS[dtype] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if _CHECKS[dtype] is not None:
            warnings.warn(f"the fused CPU BatchNorm + LIF is off for {dtype} ({_CHECKS[dtype]}); the modules run")
    return _CHECKS[dtype]


def _check(dtype: torch.dtype) -> Optional[str]:
    from fullrange.kernels import bn_lif_cpu as K

    g = torch.Generator().manual_seed(0)
    C = 24
    c = (torch.randn(16, C, 5, 7, generator=g, dtype=dtype) * 3 + 0.5).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)
    y, mean, invstd = torch.ops.aten.native_batch_norm(c, w, b, None, None, True, 0.1, 1e-5)
    mean2, var = torch.ops.aten.batch_norm_update_stats(c, None, None, 0.1)
    consts = K.unit_consts(C, dtype)
    invstd2 = K.set_batchnorm(consts, False, mean2, var, 1e-5, w, b)
    if not (torch.equal(mean, mean2) and np.array_equal(invstd.numpy(), invstd2)):
        return "its batch statistics differ from aten.native_batch_norm's"
    if not torch.equal(K.bn_output(c, consts), y):
        return "aten.native_batch_norm rounds its output otherwise"
    return None


class FusedUnitCPU(torch.autograd.Function):
    """spikes = lif(bn(c) + r) with r = residual (a spike tensor), residual_bn(residual), or none.
    params: bn's weight and bias, then residual_bn's. See the module docstring."""

    @staticmethod
    def forward(ctx, c, residual, bn, residual_bn, lif, T, pack, *params):
        from fullrange.kernels import bn_lif_cpu as K
        from fullrange.kernels.bn_lif import running_stats_weight

        consts = K.unit_consts(c.shape[1], c.dtype)
        ctx.invstd = []
        for m, x, is_residual in ((bn, c, False), (residual_bn, residual, True)):
            if m is not None:  # ATen's statistics kernel; it updates the running ones too
                mean, var = torch.ops.aten.batch_norm_update_stats(x, m.running_mean, m.running_var,
                                                                   running_stats_weight(m))
                ctx.invstd.append(K.set_batchnorm(consts, is_residual, mean, var, m.eps, m.weight, m.bias))
        if residual is not None and residual_bn is None:
            K.set_spike_residual(consts)
        spikes = K.unit_forward(c, T, consts, lif.decay, lif.threshold, lif.reset == "soft", residual)
        spike_residual = pack and residual is not None and residual_bn is None
        saved, ctx.meta = _packed_once(residual, residual.dtype) if spike_residual else (residual, None)
        ctx.save_for_backward(c, saved)
        ctx.consts, ctx.modules, ctx.T = consts, (bn, residual_bn, lif), T
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes):
        from fullrange.kernels import bn_lif_cpu as K

        c, residual = ctx.saved_tensors
        bn, residual_bn, lif = ctx.modules
        consts, T = ctx.consts, ctx.T
        if ctx.meta is not None:
            residual = unpack_spikes(residual, ctx.meta)
        gz, partial = K.unit_grad_z(grad_spikes, c, T, consts, lif.decay, lif.threshold, lif.reset == "soft",
                                    lif.surrogate_alpha, lif.detach_reset, residual, residual_bn is not None)
        n = c.numel() // c.shape[1]
        grads = []  # weight and bias gradients of bn, then residual_bn
        for m, invstd, is_residual in zip((bn, residual_bn), ctx.invstd, (False, True)):
            if m is not None:
                gw, gb = K.set_grad_bn(consts, is_residual, partial, n, invstd, m.weight)
                grads += [gw.to(m.weight.dtype), gb.to(m.bias.dtype)]
        spike_residual = residual is not None and residual_bn is None  # its gradient is g_z itself
        gc, gd = K.unit_grad_bn(gz, c, T, consts, residual if residual_bn is not None else None,
                                in_place=not spike_residual)
        needs = ctx.needs_input_grad
        grad_res = gd if residual_bn is not None else (gz if spike_residual and needs[1] else None)
        return (gc if needs[0] else None, grad_res, None, None, None, None, None,
                *[g if need else None for g, need in zip(grads, needs[7:])])
