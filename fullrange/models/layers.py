"""Building blocks shared by the spiking students.

Students run convolutions and BatchNorm on time-merged tensors [T*B, C, H, W] (t-major: row
t*B + b holds sample b at step t). Every LIF sees the same memory viewed as [T, B, ...].
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fullrange.models import unit_cpu
from fullrange.models.memory import MemoryModes, NeuronUnitCPU, SpikeConv2d, is_nhwc, recomputed
from fullrange.neuron import LIF, resolve_backend


class MergedLIF(LIF):
    """LIF applied to a time-merged tensor: x[T*B, ...] -> spikes[T*B, ...] (same layout).

    The tensor is viewed as [T, B, ...] (no copy for contiguous or channels_last inputs).
    """

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:  # type: ignore[override]
        nhwc = is_nhwc(x)
        return _merged(super().forward(_time_major(x, T, nhwc)), nhwc)

    def input_grad(self, x: torch.Tensor, grad_spikes: torch.Tensor, T: int) -> torch.Tensor:  # type: ignore[override]
        """dL/dx[T*B, ...] of forward(x, T) from x and dL/dspikes, without the forward's graph
        (neuron.lif_input_grad); in x's layout."""
        nhwc = is_nhwc(x)
        return _merged(super().input_grad(_time_major(x, T, nhwc), _time_major(grad_spikes, T, nhwc)), nhwc)

    def forward_constant(self, y: torch.Tensor, T: int) -> torch.Tensor:  # type: ignore[override]
        """spikes[T*B, ...] of forward(repeat_time(y, T), T) for a y[B, ...] that is the same at
        every step, without building the repeat (LIF.forward_constant); values only, in y's
        layout."""
        nhwc = is_nhwc(y)
        return _merged(super().forward_constant(_time_major(y, 1, nhwc)[0], T), nhwc)

    def constant_input_grad(self, y: torch.Tensor, grad_spikes: torch.Tensor, T: int) -> torch.Tensor:  # type: ignore[override]
        """dL/dy[B, ...] of forward_constant(y, T) from dL/dspikes[T*B, ...]: the T steps'
        gradients summed (LIF.constant_input_grad); in y's layout."""
        nhwc = is_nhwc(y)
        grad = super().constant_input_grad(_time_major(y, 1, nhwc)[0], _time_major(grad_spikes, T, nhwc))
        return _merged(grad.unsqueeze(0), nhwc)


def _time_major(x: torch.Tensor, T: int, nhwc: bool) -> torch.Tensor:
    """x[T*B, C, H, W] (or [T*B, ...]) -> [T, B, ...] in memory order: [T, B, H, W, C] when nhwc
    (a view of a channels_last x, LIF being elementwise), else [T, B, C, H, W]; a view where x
    is laid out so, else a copy."""
    if x.shape[0] % T:
        raise ValueError(f"MergedLIF: leading dim {x.shape[0]} is not a multiple of T={T}")
    xp = x.permute(0, 2, 3, 1) if nhwc else x
    return xp.reshape(T, x.shape[0] // T, *xp.shape[1:])


def _merged(y: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """Inverse of _time_major on a contiguous y: [T*B, C, H, W] (channels_last when nhwc)."""
    y = y.view(-1, *y.shape[2:])
    return y.permute(0, 3, 1, 2) if nhwc else y


def _fused_bn_lif(bn: nn.Module, lif: LIF, c: torch.Tensor, residual: Optional[torch.Tensor]):
    """fullrange.kernels.bn_lif (Triton) when it serves this call, else None: a training-mode
    affine nn.BatchNorm2d on a CUDA channels_last c [T*B, C, H, W] (residual alike; any
    autocast dtype), eager mode, a LIF whose backend resolves to Triton
    (neuron.resolve_backend), once the kernel's first-use check on the device has passed.
    (On the CPU, NeuronUnits.neuron_unit runs models.unit_cpu, which also fuses a downsample's
    BatchNorm, before it gets here.)"""
    if not (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and lif.backend != "torch" and c.is_cuda
            and c.dim() == 4 and c.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling()):
        return None
    if residual is not None and not (residual.shape == c.shape
                                     and residual.is_contiguous(memory_format=torch.channels_last)):
        return None
    if resolve_backend(lif.backend, c) != "triton" or _triton_fused_unusable(c.device) is not None:
        return None
    from fullrange.kernels.bn_lif import bn_lif_triton

    return bn_lif_triton


_TRITON_FUSED_CHECKS: dict = {}  # str(device) -> None (the fused kernel agrees with the modules) or why not


@torch.compiler.disable
def _triton_fused_unusable(device: torch.device) -> Optional[str]:
    """Why fullrange.kernels.bn_lif cannot serve `device`, or None: compiled and run once per
    device on a small float32 batch against nn.BatchNorm2d + the LIF modules (spikes may differ
    only where the membrane is within rounding of the threshold; gradients to 1e-4), for both
    resets with a residual. A failure warns once; the modules then run unfused."""
    key = str(device)
    if key not in _TRITON_FUSED_CHECKS:
        _TRITON_FUSED_CHECKS[key] = _triton_fused_check(device)
        if _TRITON_FUSED_CHECKS[key] is not None:
            warnings.warn(f"model.fuse_bn_lif: the Triton BN+LIF kernel is unusable on {key} "
                          f"({_TRITON_FUSED_CHECKS[key]}); BatchNorm and LIF run unfused")
    return _TRITON_FUSED_CHECKS[key]


def _triton_fused_check(device: torch.device) -> Optional[str]:
    import copy

    g = torch.Generator().manual_seed(0)
    c = (torch.randn(4 * 8, 16, 6, 6, generator=g) * 1.5 + 0.3).to(device)
    r = (torch.rand(c.shape, generator=g) < 0.3).float().to(device)
    grad = torch.randn(c.shape, generator=g).to(device)
    c, r, grad = (t.contiguous(memory_format=torch.channels_last) for t in (c, r, grad))
    try:
        from fullrange.kernels.bn_lif import bn_lif_triton

        with torch.enable_grad():
            for reset, decay in (("hard", 0.5), ("soft", 0.2)):
                lif = MergedLIF(decay=decay, reset=reset, backend="torch")
                results = []
                for fused in (True, False):
                    bn = nn.BatchNorm2d(16).to(device)
                    cc, rr = c.clone().requires_grad_(), r.clone().requires_grad_()
                    s = bn_lif_triton(cc, bn, 4, decay, 1.0, reset, 4.0, False, rr) if fused \
                        else lif(bn(cc) + rr, 4)
                    (s * grad).sum().backward()
                    results.append((s, cc.grad, rr.grad, copy.deepcopy(bn.running_var)))
                (sa, ga, gra, va), (sb, gb, grb, vb) = results
                if (sa != sb).float().mean().item() > 1e-3:
                    return f"its spikes differ from the modules' ({reset} reset)"
                for a, b in ((ga, gb), (gra, grb), (va, vb)):
                    if not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
                        return f"its gradients or running statistics differ from the modules' ({reset} reset)"
    except Exception as err:  # noqa: BLE001 - any compile or launch failure means: do not use it
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def bn_lif(bn: nn.Module, lif: LIF, c: torch.Tensor, T: int, residual: Optional[torch.Tensor] = None,
           fuse: bool = True) -> torch.Tensor:
    """spikes = lif(bn(c) + residual, T) on a time-merged c [T*B, C, H, W] (residual alike, or
    None). With fuse, where it applies (CUDA; see _fused_bn_lif) one fused Triton kernel runs
    BatchNorm's statistics, its apply, the add and the LIF, and keeps only c (and residual) for
    the backward; otherwise the modules run one after another."""
    fused = _fused_bn_lif(bn, lif, c, residual) if fuse else None
    if fused is not None:
        return fused(c, bn, T, lif.decay, lif.threshold, lif.reset, lif.surrogate_alpha, lif.detach_reset, residual)
    y = bn(c)
    return lif(y if residual is None else y + residual, T)


class NeuronUnits(MemoryModes):
    """A spiking student or block whose forward runs BatchNorm (+ residual) -> LIF units."""

    def neuron_unit(self, bn: nn.Module, lif: nn.Module, c: torch.Tensor, T: int,
                    residual: Optional[torch.Tensor] = None, residual_bn: Optional[nn.Module] = None) -> torch.Tensor:
        """spikes = lif(bn(c) + r, T) (layers.bn_lif), r = residual_bn(residual) where the block
        has a downsample shortcut, residual (a spike tensor) where it has an identity one, or
        nothing. c, residual [T*B, C, H, W].

        With model.fuse_bn_lif, on the CPU in channels_last float32/float64 (unit_cpu.serves),
        one fused op (unit_cpu.FusedUnitCPU) runs the unit in every memory mode and keeps only
        c and residual (a spike residual as bits in spikes_1bit): nothing of BatchNorm's output
        or the LIF's input is kept or written. Otherwise, in spikes_1bit, it keeps the same and
        recomputes BatchNorm, the add and the LIF in the backward: on the CPU with the lean
        NeuronUnitCPU (NCHW, autocast), elsewhere with `recomputed` (in checkpoint mode the whole
        block is recomputed; a second, nested recompute raised the demo's peak)."""
        fuse = self.fuse_bn_lif
        if fuse and unit_cpu.serves(c, bn, lif, residual, residual_bn):  # any memory mode: it keeps only c, r
            params = [p for m in (bn, residual_bn) if m is not None for p in (m.weight, m.bias)]
            return unit_cpu.FusedUnitCPU.apply(c, residual, bn, residual_bn, lif, T, self.memory == "spikes_1bit",
                                               *params)
        if self.memory != "spikes_1bit":
            return bn_lif(bn, lif, c, T, residual if residual_bn is None else residual_bn(residual), fuse)
        bns = (bn,) if residual_bn is None else (bn, residual_bn)
        if NeuronUnitCPU.serves(c, bns) and torch.is_grad_enabled():
            params = [p for m in bns for p in (m.weight, m.bias)]
            return NeuronUnitCPU.apply(c, residual, bn, residual_bn, lif, T, *params)
        if residual is None:
            return recomputed(lambda c_: bn_lif(bn, lif, c_, T, fuse=fuse), (c,), bns, (False,))
        shortcut = residual_bn if residual_bn is not None else (lambda r: r)  # a spike residual: added as it is
        return recomputed(lambda c_, r: bn_lif(bn, lif, c_, T, shortcut(r), fuse), (c, residual), bns,
                          (False, residual_bn is None))

    def time_invariant_unit(self, bn: nn.Module, lif: nn.Module, c: torch.Tensor, T: int,
                            made_by: Optional[Tuple[nn.Module, torch.Tensor]] = None) -> torch.Tensor:
        """spikes[T*B, C, H, W] = lif(bn(c) repeated over T, T) for a stem output c[B, C, H, W]
        that is the same at every step (stem_runs_once). BatchNorm runs once
        (batch_norm_over_time) and the LIF reads its output [B] at every step
        (MergedLIF.forward_constant): in training through TimeInvariantUnit, which keeps only c,
        in every memory mode (in spikes_1bit, given made_by = (conv, image) with c = conv(image),
        only the image: the conv runs again in the backward); without autograd directly. Under
        torch.compile, or with a BatchNorm that TimeInvariantUnit does not serve, the LIF runs
        on the repeated output (autograd; in spikes_1bit recomputed from c)."""
        eager = not torch.compiler.is_compiling()
        if eager and TimeInvariantUnit.serves(bn) and torch.is_grad_enabled():
            return TimeInvariantUnit.apply(c, bn, lif, T, made_by if self.memory == "spikes_1bit" else None,
                                           bn.weight, bn.bias)
        if eager and not torch.is_grad_enabled():
            return lif.forward_constant(batch_norm_over_time(bn, c, T), T)

        def unit(c_: torch.Tensor) -> torch.Tensor:
            return lif(repeat_time(batch_norm_over_time(bn, c_, T), T), T)
        return recomputed(unit, (c,), (bn,), (False,)) if self.memory == "spikes_1bit" else unit(c)


class TimeInvariantUnit(torch.autograd.Function):
    """c[B, C, H, W] -> spikes[T*B, C, H, W] = lif(bn(c) repeated over T, T) for a training-mode
    affine nn.BatchNorm2d, keeping only c for the backward (any device, any memory mode), or,
    given made_by = (conv, image) with c = conv(image), only the image (the stem conv's node
    keeps it anyway): the backward runs conv(image) again, the same call on the same values
    under the forward's autocast state, so the same c bit for bit.

    forward, without autograd: batch_norm_over_time (BatchNorm's running statistics update as on
    the T copies), then MergedLIF.forward_constant: the LIF reads bn(c) [B] at every step.
    backward: bn(c) again from c by aten.native_batch_norm on the batch statistics (the call
    batch_norm_over_time makes, so the same values bit for bit), the LIF's input gradient summed
    over the T steps (MergedLIF.constant_input_grad), and aten.native_batch_norm_backward. With
    the CPU kernel nothing of size T*B is kept or built besides the spikes and their gradient;
    other LIF backends build the repeat for the time of the LIF's backward."""

    @staticmethod
    def serves(bn: nn.Module) -> bool:
        return type(bn) is nn.BatchNorm2d and bn.training and bn.affine

    @staticmethod
    def forward(ctx, c, bn, lif, T, made_by, weight, bias):
        with torch.no_grad():
            spikes = lif.forward_constant(batch_norm_over_time(bn, c, T), T)
        ctx.conv = None if made_by is None else made_by[0]
        ctx.save_for_backward(c if made_by is None else made_by[1])
        ctx.modules, ctx.T = (bn, lif), T
        device = c.device.type
        ctx.autocast = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes):
        (c,) = ctx.saved_tensors
        bn, lif = ctx.modules
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if ctx.conv is not None:
                c = ctx.conv(c)  # c was the image
            y, mean, invstd = torch.ops.aten.native_batch_norm(c, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
            grad_y = lif.constant_input_grad(y, grad_spikes, ctx.T).to(y.dtype)
        del y
        needs = ctx.needs_input_grad
        grad_c, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, c, bn.weight, None, None, mean, invstd, True, bn.eps, [needs[0], needs[5], needs[6]])
        return grad_c, None, None, None, None, grad_w, grad_b


def encode_direct(x: torch.Tensor, T: Optional[int], repeat: bool = True) -> Tuple[torch.Tensor, int]:
    """Direct encoding. Image x[B, C, H, W] -> x repeated T times as [T*B, C, H, W] in x's
    memory format (repeat_time; with repeat=False: x itself, for a stem that runs once; see
    stem_runs_once).

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
    return (repeat_time(x, T) if repeat else x), T


def stem_runs_once(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the student's stem (its layers before the first neuron) runs once on the image
    x[B, C, H, W] instead of on its T copies (`model.stem_once`, the student's `stem_once`).

    Direct encoding feeds the stem the same image at every step, so its convolution and
    BatchNorm give the same output T times: BatchNorm's batch statistics over T identical copies
    are those of one. Running it once computes the same function (equal to float rounding: a
    reduction over B instead of T*B elements rounds differently) at 1/T of the stem's cost,
    and keeps 1/T of its activations. Event input (x[T, B, ...]) and a BatchNorm other than
    nn.BatchNorm2d (SyncBatchNorm) run per step; `stem_once = False` reproduces the official
    code's op order bit for bit (tests/test_official.py)."""
    return model.stem_once and x.dim() == 4 and type(model.bn1) is nn.BatchNorm2d


def repeat_time(y: torch.Tensor, T: int) -> torch.Tensor:
    """y[B, C, H, W] -> [T*B, C, H, W] (row t*B + b = y[b]) in y's memory format (channels_last
    stays channels_last). Its backward sums the T gradients."""
    nhwc = is_nhwc(y)
    yp = y.permute(0, 2, 3, 1) if nhwc else y
    out = yp.unsqueeze(0).expand(T, *yp.shape).reshape(T * yp.shape[0], *yp.shape[1:])
    return out.permute(0, 3, 1, 2) if nhwc else out


def batch_norm_over_time(bn: nn.Module, c: torch.Tensor, T: int) -> torch.Tensor:
    """bn applied to T identical copies of c[B, C, H, W], returned once ([B, C, H, W]).

    In training the batch statistics are c's (those of the T copies), and the running
    statistics update as bn would on the copies: running_var takes the unbiased variance over
    T*B*H*W samples, num_batches_tracked counts one batch. Evaluation, or no running
    statistics: bn(c) itself (an affine map per element, or c's batch statistics)."""
    if not (bn.training and bn.track_running_stats) or T == 1:
        return bn(c)
    y, mean, invstd = torch.ops.aten.native_batch_norm(c, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        n = T * c.numel() // c.shape[1]
        var = invstd.double().pow(-2).sub_(bn.eps).mul_(n / (n - 1))  # unbiased, over the T copies
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(var.to(bn.running_var.dtype), alpha=factor)
    return y


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


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d(1) (same module, no state) whose backward writes dL/dx in x's layout
    in one pass: x[N, C, H, W] -> [N, C, 1, 1]. ATen pools through mean, whose backward divides
    the expanded gradient into a new NCHW tensor, which a channels_last consumer (the LIF or the
    residual add before the pool) then copies again: 1.1 + 1.6 ms of the demo step's 72."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return super().forward(x)
        return _GlobalAvgPool.apply(x)


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.nhwc = x.shape, is_nhwc(x)
        ctx.expand = unit_cpu.reads_pixel_broadcast_grad(x)
        return torch.nn.functional.adaptive_avg_pool2d(x, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        """dL/dx = dL/dy / (H*W) at every pixel (mean's backward, the same values): expanded over
        the pixels, never written out, where x's producer reads it so (the fused CPU unit: one
        [N, C, H, W] gradient less at the backward's peak), else written once in x's layout."""
        h, w = ctx.shape[2:]
        if ctx.expand:
            return (grad / (h * w)).expand(ctx.shape)
        layout = torch.channels_last if ctx.nhwc else torch.contiguous_format
        grad_x = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        return grad_x.copy_((grad / (h * w)).expand(ctx.shape))


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
