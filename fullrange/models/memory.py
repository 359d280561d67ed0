"""Spike-aware activation memory for the spiking students: `model.memory`.

    default      autograd saves what each op's backward needs (conv/linear inputs, BN inputs,
                 the LIF's h - threshold), in the compute dtype.
    spikes_1bit  a conv or linear whose input is a spike tensor (every value 0 or 1) saves that
                 input bit-packed, 1 bit per element instead of 2-4 bytes; its backward unpacks
                 it and calls the same ATen backward as autograd, so gradients are bit-identical.
                 Each BatchNorm (+ residual) -> LIF keeps only the conv output it normalises and
                 recomputes BN-apply, the add and the LIF in the backward (layers.NeuronUnits);
                 a stem that runs once per image keeps only the image and runs its conv again
                 (layers.TimeInvariantUnit).
    checkpoint   every residual block (and the stem) is recomputed in the backward: a block
                 keeps only its input (bit-packed when it is a spike tensor) and its forward runs
                 a second time, in the backward, under the forward's autocast state; BatchNorm
                 running statistics are restored after the recompute, so they update once.

set_memory(model, "spikes_1bit", recompute_blocks=N) (`model.recompute_blocks`) mixes the two:
the first N residual blocks run as in checkpoint, the rest as in spikes_1bit. The early blocks
hold the most activation for the same compute, so a few of them buy most of checkpoint's
saving: ResNet-19 with N=2 peaks 3.1x below default at +7-15% step time, where spikes_1bit
alone is 2.5x (+5%) and checkpoint 3.4x (+30%) (BENCHMARKS.md).

Every mode gives the same spikes, logits, gradients and running statistics as `default`
(tests/test_memory_modes.py); only the memory held between forward and backward and the time
differ (bench/memory.py, bench/step.py). Inference (no_grad, eval) runs the plain modules.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fullrange.models.conv_grad import add_conv_input_grad, conv_input_grad, pointwise_strided

MEMORY_MODES = ("default", "spikes_1bit", "checkpoint")
_BITS = 8


# 8 bytes b_0..b_7 (each 0 or 1) read as one little-endian int64 v: (v * _GATHER) >> 56 is
# sum_i b_i << i (the partial products land on distinct bits, so nothing carries into the top
# byte). Back: replicate a byte into all eight (* _SPREAD), keep bit i in byte i (& _SELECT),
# lift each kept bit to bit 7 of its byte (+ _LIFT: byte i gets 0x80 - 2^i, no carries), shift
# it to bit 0 and mask (>> 7, & _ONES). int64 arithmetic wraps, as the low 64 bits need.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)
_LIFT = 0x00406070787C7E7F
_ONES = 0x0101010101010101


def is_nhwc(x: torch.Tensor) -> bool:
    """x is a 4-d tensor laid out channels_last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as a contiguous tensor in its own memory order, and whether that order is NHWC."""
    nhwc = is_nhwc(x)
    return (x.permute(0, 2, 3, 1) if nhwc else x.contiguous()), nhwc


def pack_spikes(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Spike tensor x[...] (every value exactly 0 or 1, any float dtype; contiguous or
    channels_last) -> (bits uint8[ceil(numel / 8)], meta). Element i of x in memory order is
    bit i % 8 of byte i // 8 (numpy's packbits with bitorder="little")."""
    flat, nhwc = _memory_order(x)
    n = flat.numel()
    b = flat.reshape(-1).to(torch.uint8)
    if n % _BITS:
        b = torch.cat([b, b.new_zeros(_BITS - n % _BITS)])
    bits = b.view(torch.int64).mul_(_GATHER).bitwise_right_shift_(56).to(torch.uint8)
    return bits, (tuple(flat.shape), x.dtype, nhwc)


def unpack_spikes(bits: torch.Tensor, meta: tuple) -> torch.Tensor:
    """Inverse of pack_spikes: the spike tensor, with its shape, dtype and memory format."""
    shape, dtype, nhwc = meta
    n = 1
    for s in shape:
        n *= s
    v = bits.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT).add_(_LIFT).bitwise_right_shift_(7)
    flat = v.bitwise_and_(_ONES).view(torch.uint8)[:n]
    x = flat.to(dtype).view(shape)
    return x.permute(0, 3, 1, 2) if nhwc else x


def _packed_once(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """pack_spikes(x), computed once per version of x: a block's spike input feeds its first conv,
    its downsample conv and its residual add, which share one copy of the bits. dtype: the dtype
    the backward unpacks to (the autocast dtype the op ran in)."""
    memo = getattr(x, "_fullrange_bits", None)
    if memo is None or memo[0] != x._version:
        memo = (x._version, *pack_spikes(x))
        x._fullrange_bits = memo
    shape, _, nhwc = memo[2]
    return memo[1], (shape, dtype, nhwc)


def _autocast_dtype(device_type: str):
    """The dtype autocast would run a conv/linear in on this device now, or None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _as_autocast(x, weight, bias):
    """(cast dtype or None, x, weight, bias in it): what autocast would hand a conv/linear."""
    cast = _autocast_dtype(x.device.type)
    if cast is None:
        return None, x, weight, bias
    return cast, x.to(cast), weight.to(cast), None if bias is None else bias.to(cast)


class _SpikeInputConvs(torch.autograd.Function):
    """conv2d(x, w_i, b_i) for each of the convs that read one spike input x (a block's first
    conv and its downsample), saving x once: bit-packed (pack) or as it is (as autograd would:
    in the autocast dtype). backward: each conv's weight and bias gradients by
    aten.convolution_backward from x, which is then freed when it was unpacked; then x's
    gradient, which needs only x's shape and layout: the first conv's (conv_grad.conv_input_grad)
    with the others' added into it in place (conv_grad.add_conv_input_grad: a strided 1x1 conv
    adds onto its stride's grid alone) where autograd would build one input-sized gradient per
    conv and sum them. x and its gradient are never in memory together in spikes_1bit.
    params: each conv's weight and bias (None without one), in the order of convs."""

    @staticmethod
    def forward(ctx, x, convs: Sequence[nn.Conv2d], pack: bool, *params):
        cast = _autocast_dtype(x.device.type)
        xc = x if cast is None else x.to(cast)
        outs = []
        with torch.autocast(x.device.type, enabled=False):
            for conv, w, b in zip(convs, params[0::2], params[1::2]):
                wc, bc = (w, b) if cast is None else (w.to(cast), None if b is None else b.to(cast))
                outs.append(F.conv2d(xc, wc, bc, conv.stride, conv.padding, conv.dilation, conv.groups))
        saved, ctx.meta = _packed_once(x, xc.dtype) if pack else (xc, None)
        ctx.save_for_backward(saved, *params[0::2])
        ctx.convs, ctx.cast, ctx.x_dtype = convs, cast, x.dtype
        ctx.has_bias = [b is not None for b in params[1::2]]
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        saved, *weights = ctx.saved_tensors
        cast, needs = ctx.cast, ctx.needs_input_grad
        weights_c = [w if cast is None else w.to(cast) for w in weights]
        x = saved if ctx.meta is None else unpack_spikes(saved, ctx.meta)
        param_grads = []
        for i, (conv, w, wc, g, has_bias) in enumerate(zip(ctx.convs, weights, weights_c, grad_outs, ctx.has_bias)):
            need_w, need_b = needs[3 + 2 * i], has_bias and needs[4 + 2 * i]
            gw, gb = None, None
            if need_w or need_b:
                _, gw, gb = torch.ops.aten.convolution_backward(
                    g, x, wc, [w.shape[0]] if has_bias else None, list(conv.stride), list(conv.padding),
                    list(conv.dilation), False, [0, 0], conv.groups, [False, need_w, need_b])
            param_grads += [None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(w.dtype)]
        shape, strides = x.shape, x.stride()
        del x
        gx = None
        if needs[0]:  # a dense conv first: the pointwise strided ones then add onto its gradient's grid
            order = sorted(range(len(ctx.convs)), key=lambda i: _pointwise(ctx.convs[i]))
            first = ctx.convs[order[0]]
            gx = conv_input_grad(grad_outs[order[0]], weights_c[order[0]], shape, strides, first.stride,
                                 first.padding, first.dilation, first.groups).to(ctx.x_dtype)
            for i in order[1:]:
                conv = ctx.convs[i]
                add_conv_input_grad(gx, grad_outs[i], weights_c[i], conv.stride, conv.padding, conv.dilation,
                                    conv.groups)
        return (gx, None, None, *param_grads)


def _pointwise(conv: nn.Conv2d) -> bool:
    return pointwise_strided(conv.weight, conv.stride, conv.padding, conv.groups)


class _PackedInputLinear(torch.autograd.Function):
    """linear(x[N, in], w, b) that saves x bit-packed; backward: the mm formulas of autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        cast, xc, wc, bc = _as_autocast(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(xc, wc, bc)
        bits, ctx.meta = _packed_once(x, xc.dtype)
        ctx.save_for_backward(bits, weight)
        ctx.args = (cast, x.dtype, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        bits, weight = ctx.saved_tensors
        cast, x_dtype, has_bias = ctx.args
        x = unpack_spikes(bits, ctx.meta)
        w = weight if cast is None else weight.to(cast)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gw = g2.t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[1] else None
        del x  # freed before the input gradient is built, as in _SpikeInputConvs
        gb = g2.sum(0).to(weight.dtype) if has_bias and ctx.needs_input_grad[2] else None
        gx = grad_out.matmul(w).to(x_dtype) if ctx.needs_input_grad[0] else None
        return gx, gw, gb


def _recording(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd records module(x) (so the module's own backward would run)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters(recurse=False)))


class SpikeConv2d(nn.Conv2d):
    """nn.Conv2d whose input is a spike tensor (0/1). With `pack_input` (set by set_memory) and
    autograd recording it saves that input bit-packed. A strided 1x1 conv (a downsample) on the
    CPU, in eager mode, runs its backward through conv_grad's pointwise path in every mode.
    Otherwise it is nn.Conv2d. Same parameters and state_dict keys as nn.Conv2d. Convs that read
    the same input run together through spike_convs. x[N, Cin, H, W] -> [N, Cout, H', W']."""

    pack_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _own_backward((self,), x):
            return super().forward(x)
        return _SpikeInputConvs.apply(x, (self,), self.pack_input, self.weight, self.bias)[0]


def spike_convs(x: torch.Tensor, convs: Sequence[SpikeConv2d]) -> tuple:
    """(conv(x) for conv in convs): SpikeConv2d layers reading one spike tensor x [N, Cin, H, W]
    (a block's first conv and its downsample). Where one of them is a strided 1x1 conv that takes
    the CPU's pointwise path, they run as one autograd node that saves x once and builds x's
    gradient in one tensor, the 1x1 conv's added onto its grid (instead of an x-sized zeroed
    gradient, held from the downsample's backward to the first conv's, and a sum). Otherwise
    each runs on its own (whose node frees its output gradient sooner)."""
    if not (_own_backward(convs, x) and _pointwise_on_cpu(convs, x)):
        return tuple(conv(x) for conv in convs)
    params = [t for conv in convs for t in (conv.weight, conv.bias)]
    return _SpikeInputConvs.apply(x, tuple(convs), convs[0].pack_input, *params)


def _own_backward(convs: Sequence[SpikeConv2d], x: torch.Tensor) -> bool:
    """Whether convs run through _SpikeInputConvs: autograd records them, their padding is zeros,
    and they pack their input (spikes_1bit) or, in CPU eager mode, one is a strided 1x1 conv."""
    if any(c.padding_mode != "zeros" for c in convs) or not any(_recording(c, x) for c in convs):
        return False
    if len({c.pack_input for c in convs}) > 1:
        raise ValueError("spike_convs: the convs of one input must all pack it (model.memory) or none")
    return convs[0].pack_input or _pointwise_on_cpu(convs, x)


def _pointwise_on_cpu(convs: Sequence[SpikeConv2d], x: torch.Tensor) -> bool:
    """One of convs is a strided 1x1 conv whose backward takes conv_grad's CPU path (eager mode)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and any(_pointwise(c) for c in convs)


class SpikeLinear(nn.Linear):
    """nn.Linear whose input is a spike tensor; bit-packed saving as SpikeConv2d. x[..., in] -> [..., out]."""

    pack_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.pack_input and _recording(self, x)):
            return super().forward(x)
        return _PackedInputLinear.apply(x, self.weight, self.bias)


def _bn_buffers(modules: Iterable[nn.Module]) -> List[torch.Tensor]:
    return [b for m in modules for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for b in mod.buffers(recurse=False)]


class _Recompute(torch.autograd.Function):
    """out = run(*inputs), keeping only the inputs (a spike input bit-packed) for the backward,
    which runs run(*inputs) again with autograd and differentiates it.
    tensors: the n inputs, then every parameter run uses (so their gradients flow as usual)."""

    @staticmethod
    def forward(ctx, run: Callable, modules: Sequence[nn.Module], spikes: Sequence[bool], *tensors):
        n = len(spikes)
        ctx.run, ctx.modules, ctx.spikes = run, modules, spikes
        device_type = tensors[0].device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        with torch.no_grad():
            out = run(*tensors[:n])
        saved, ctx.meta = [], []
        for x, is_spikes in zip(tensors[:n], spikes):
            bits, meta = _packed_once(x, x.dtype) if is_spikes else (x, None)
            saved.append(bits)
            ctx.meta.append(meta)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        n = len(ctx.spikes)
        need_in, need_params = ctx.needs_input_grad[3:3 + n], ctx.needs_input_grad[3 + n:]
        inputs = [(saved if meta is None else unpack_spikes(saved, meta)).detach().requires_grad_(need)
                  for saved, meta, need in zip(ctx.saved_tensors, ctx.meta, need_in)]
        params = [p for p, need in zip(_params(ctx.modules), need_params) if need]
        device_type, enabled, dtype = ctx.autocast
        stats = [b.clone() for b in _bn_buffers(ctx.modules)]
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out = ctx.run(*inputs)
        wrt = [x for x in inputs if x.requires_grad] + params
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
        with torch.no_grad():  # after the grad: BatchNorm's backward version-checks its buffers
            for b, old in zip(_bn_buffers(ctx.modules), stats):
                b.copy_(old)
        return (None, None, None, *[next(grads) if need else None for need in list(need_in) + list(need_params)])


def _params(modules: Sequence[nn.Module]) -> List[torch.Tensor]:
    return [p for m in modules for p in m.parameters()]


def recomputed(run: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], modules: Sequence[nn.Module],
               spikes: Sequence[bool]) -> torch.Tensor:
    """run(*inputs), whose activations are recomputed in the backward instead of kept.

    modules: every module run uses (their parameters get gradients, their BatchNorm running
    statistics are restored after the recompute, so they update once). spikes[i]: inputs[i] is
    a spike tensor (kept bit-packed); the others are kept as they are. Without autograd
    recording this is run(*inputs)."""
    params = _params(modules)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*inputs, *params)):
        return run(*inputs)
    return _Recompute.apply(run, tuple(modules), tuple(spikes), *inputs, *params)


class MemoryModes(nn.Module):
    """Base of the spiking students and their blocks: `memory` (one of MEMORY_MODES, set by
    set_memory), read by `segment` here and by layers.NeuronUnits.neuron_unit."""

    memory = "default"
    fuse_bn_lif = True  # model.fuse_bn_lif: BatchNorm + LIF as one kernel where one serves (layers.bn_lif)

    def segment(self, run: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                modules: Sequence[nn.Module], spikes: Sequence[bool]) -> torch.Tensor:
        """The model's stem, or a block (called on the block itself): recomputed in the backward
        when this module is in checkpoint mode."""
        if self.memory == "checkpoint":
            return recomputed(run, inputs, modules, spikes)
        return run(*inputs)


class NeuronUnitCPU(torch.autograd.Function):
    """spikes_1bit's BatchNorm (+ residual) -> LIF on the CPU, keeping only c (and the residual:
    a spike tensor as bits, a downsample's conv output as it is) for the backward.

    forward: the modules as the default mode runs them (so the spikes and the running
    statistics are the default's), under no_grad. backward: BatchNorm's output again from c by
    aten.native_batch_norm on the batch statistics (bit-identical to the module's, which runs
    the same kernel on the CPU; tests/test_memory_modes.py), the add, the LIF's input gradient
    (MergedLIF.input_grad: the CPU kernel's backward alone, which recomputes h from its input)
    and aten.native_batch_norm_backward: the kernels autograd runs in the default mode, without
    a second forward of the LIF, a nested autograd graph or a copy of the running statistics
    (the demo step's spikes_1bit overhead went from +28-30% to +17-23%; BENCHMARKS.md).
    params: each BatchNorm's weight and bias (bn's, then residual_bn's)."""

    @staticmethod
    def serves(c: torch.Tensor, bns: Sequence[nn.Module]) -> bool:
        return c.device.type == "cpu" and all(type(m) is nn.BatchNorm2d and m.training and m.affine for m in bns)

    @staticmethod
    def forward(ctx, c, residual, bn, residual_bn, lif, T, *params):
        with torch.no_grad():
            y = bn(c)
            if residual is not None:
                y = y + (residual if residual_bn is None else residual_bn(residual))
            spikes = lif(y, T)
        spike_residual = residual is not None and residual_bn is None
        saved_residual, ctx.meta = _packed_once(residual, residual.dtype) if spike_residual else (residual, None)
        ctx.save_for_backward(c, saved_residual)
        ctx.modules, ctx.T = (bn, residual_bn, lif), T
        ctx.autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes):
        c, residual = ctx.saved_tensors
        bn, residual_bn, lif = ctx.modules
        enabled, dtype = ctx.autocast
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            y, mean, invstd = torch.ops.aten.native_batch_norm(c, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
            if residual_bn is not None:
                r, mean_r, invstd_r = torch.ops.aten.native_batch_norm(
                    residual, residual_bn.weight, residual_bn.bias, None, None, True, 0.0, residual_bn.eps)
            elif residual is not None:
                r = unpack_spikes(residual, ctx.meta)
            else:
                r = None
            y_dtype, r_dtype = y.dtype, (None if residual is None else r.dtype)
            z = y if residual is None else y + r
            del y, r  # the backward's peak: keep no more than z, then its gradient
            grad_z = lif.input_grad(z, grad_spikes, ctx.T)
            del z
        needs = ctx.needs_input_grad
        grad_c, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z.to(y_dtype), c, bn.weight, None, None, mean, invstd, True, bn.eps, [needs[0], needs[6], needs[7]])
        grad_res, grads_rbn = None, (None, None)
        if residual_bn is not None:
            grad_res, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_z.to(r_dtype), residual, residual_bn.weight, None, None, mean_r, invstd_r, True,
                residual_bn.eps, [needs[1], needs[8], needs[9]])
            grads_rbn = (gw, gb)
        elif residual is not None and needs[1]:
            grad_res = grad_z.to(r_dtype)
        return (grad_c, grad_res, None, None, None, None, grad_w, grad_b, *grads_rbn)[:len(needs)]


def set_fusion(model: nn.Module, on: bool) -> nn.Module:
    """model.fuse_bn_lif: whether the student's BatchNorm -> LIF pairs may run as one fused kernel."""
    for m in model.modules():
        if isinstance(m, MemoryModes):
            m.fuse_bn_lif = bool(on)
    return model


def check_memory_mode(mode: str) -> None:
    if mode not in MEMORY_MODES:
        raise ValueError(f"model.memory must be one of {MEMORY_MODES}, got {mode!r}")


def residual_blocks(model: nn.Module) -> List[MemoryModes]:
    """The residual blocks of a spiking student, in forward order."""
    return [m for m in model.modules() if isinstance(m, MemoryModes) and m is not model]


def set_memory(model: nn.Module, mode: str, recompute_blocks: int = 0) -> nn.Module:
    """Put a spiking student in a memory mode (see the module docstring); returns the model.

    The model must be a MemoryModes (its forward reads `memory` to decide what to recompute);
    its SpikeConv2d / SpikeLinear layers pack their inputs in spikes_1bit. recompute_blocks
    (spikes_1bit only): the first N residual blocks run as in checkpoint instead."""
    check_memory_mode(mode)
    if not isinstance(model, MemoryModes):
        raise ValueError(f"model.memory={mode!r}: {type(model).__name__} has no memory modes "
                         f"(only the spiking students do)")
    blocks = residual_blocks(model)
    if recompute_blocks and (mode != "spikes_1bit" or not 0 < recompute_blocks <= len(blocks)):
        raise ValueError(f"model.recompute_blocks={recompute_blocks}: expected 0, or 1..{len(blocks)} "
                         f"(this model's residual blocks) with model.memory=spikes_1bit, got memory={mode!r}")
    _set_mode(model, mode)
    for block in blocks[:recompute_blocks]:
        _set_mode(block, "checkpoint")
    return model


def _set_mode(root: nn.Module, mode: str) -> None:
    for m in root.modules():
        if isinstance(m, MemoryModes):
            m.memory = mode
        if isinstance(m, (SpikeConv2d, SpikeLinear)):
            m.pack_input = mode == "spikes_1bit"
