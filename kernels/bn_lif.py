"""BatchNorm (training mode) + optional residual add + multi-step LIF, fused, in Triton.

For a conv output c [T*B, C, H, W] in channels_last memory, viewed as [T, P, C] (P = B*H*W; channels innermost),
batch statistics over (T, P) per channel, then

    y = c * a + b (+ r),   a = weight * invstd,  b = bias - mean * a
    h_t = decay * v_{t-1} + y_t,  s_t = H(h_t - threshold),  hard / soft reset    (fullrange.neuron)

Kernels, each a grid of [ROWS, BLOCK_C] tiles (loads coalesced along the channels):
  _stats     one pass over c: per tile of rows the column mean and M2 (sum of squared
             deviations), merged over the program's tiles by Chan's rule; the partials of all
             programs are merged in float64 by torch (no atomics: deterministic).
  _fire      reads c (and r), writes only the spikes; y and h stay in registers.
  _grad_lif  recomputes h - threshold for the program's columns into g_y's memory (the same
             program reads it back at once), runs the LIF's reverse-time recurrence
             (fullrange.kernels.lif.lif_grad_step), writes g_y (= the residual's gradient) and
             per-program partial sums of g_y and g_y * xhat.
  _grad_bn   g_c = weight * invstd * (g_y - mean(g_y) - xhat * mean(g_y * xhat)).
Autograd keeps c (and r): no BN output, no LIF state. Running statistics update as
nn.BatchNorm2d does (momentum, or the cumulative average when momentum is None; unbiased
variance). c may be float32, bfloat16 or float16 (autocast's conv output); all arithmetic is
float32, spikes and g_c have c's dtype, g_y is float32. No host synchronisation.

Kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this
module was imported (tests). fullrange.models.layers decides when this path applies.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .lif import _TRITON_ERROR, triton, tl

if triton is not None:
    from .lif import lif_grad_step

__all__ = ["bn_lif_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_GPU_ROWS, _GPU_WARPS = 32, 4  # a [32, <=64] tile per step: 16 fp32 per thread; not tuned on hardware yet
_STATS_TILES = 8  # row tiles merged per statistics program (fewer float64 partials to merge)
# y = c * a + b and h = decay * v + y round as separate operations in the forward and in the
# backward's recompute alike, so both see the same spikes.
_NO_FMA = {"enable_fp_fusion": False}

if triton is not None:

    @triton.jit
    def _stats_kernel(c_ptr, mean_ptr, m2_ptr, R, C, TILES: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        """Partials [programs_r, C]: mean and M2 of rows [pid*TILES*ROWS, ...) of c [R, C]."""
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        n = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(TILES):
            rows = (pid_r * TILES + i) * ROWS + tl.arange(0, ROWS)
            rmask = rows < R
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(c_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            nb = tl.sum(rmask.to(tl.float32), axis=0)
            mb = tl.sum(x, axis=0) / tl.maximum(nb, 1.0)
            dev = tl.where(mask, x - mb[None, :], 0.0)
            m2b = tl.sum(dev * dev, axis=0)
            total = n + nb
            delta = mb - mean
            w = nb / tl.maximum(total, 1.0)
            mean = mean + delta * w
            m2 = m2 + m2b + delta * delta * n * w
            n = total
        tl.store(mean_ptr + pid_r * C + cols, mean, mask=cmask)
        tl.store(m2_ptr + pid_r * C + cols, m2, mask=cmask)

    @triton.jit(do_not_specialize=["T", "step"])
    def _fire_kernel(c_ptr, r_ptr, s_ptr, a_ptr, b_ptr, T, P, C, step, decay, threshold,
                     HAS_R: tl.constexpr, SOFT_RESET: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """Spikes s [T, P, C] of y = c * a + b (+ r)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < P)[:, None] & cmask[None, :]
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0)[None, :]
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        v = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for _ in range(T):
            y = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32) * a + b
            if HAS_R:
                y = y + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            h = decay * v + y
            spike = h >= threshold
            s = tl.where(spike, 1.0, 0.0)
            tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
            if SOFT_RESET:
                v = h - threshold * s
            else:
                v = tl.where(spike, 0.0, h)
            offs += step

    @triton.jit(do_not_specialize=["T", "step"])
    def _grad_lif_kernel(c_ptr, r_ptr, gs_ptr, gy_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, sg_ptr, sgx_ptr,
                         T, P, C, step, decay, threshold, alpha, HAS_R: tl.constexpr, SOFT_RESET: tl.constexpr,
                         DETACH_RESET: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """g_y [T, P, C] (float32) from g_s; partial sums of g_y and g_y * xhat per program row."""
        pid_r = tl.program_id(0)
        rows = pid_r * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < P)[:, None] & cmask[None, :]
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0)[None, :]
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        v = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for _ in range(T):  # recompute h - threshold, parked in g_y's memory
            y = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32) * a + b
            if HAS_R:
                y = y + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            h = decay * v + y
            spike = h >= threshold
            tl.store(gy_ptr + offs, h - threshold, mask=mask)
            if SOFT_RESET:
                v = h - threshold * tl.where(spike, 1.0, 0.0)
            else:
                v = tl.where(spike, 0.0, h)
            offs += step
        g_next = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        acc_g = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        acc_gx = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for _ in range(T):  # reverse time
            offs -= step
            d = tl.load(gy_ptr + offs, mask=mask, other=0.0)
            gs = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(mask, lif_grad_step(gs, d, g_next, decay, threshold, alpha, SOFT_RESET, DETACH_RESET), 0.0)
            tl.store(gy_ptr + offs, g, mask=mask)
            g_next = g
            xhat = (tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mu) * invstd
            acc_g += g
            acc_gx += g * xhat
        tl.store(sg_ptr + pid_r * C + cols, tl.sum(acc_g, axis=0), mask=cmask)
        tl.store(sgx_ptr + pid_r * C + cols, tl.sum(acc_gx, axis=0), mask=cmask)

    @triton.jit
    def _grad_bn_kernel(c_ptr, gy_ptr, gc_ptr, mean_ptr, invstd_ptr, scale_ptr, mg_ptr, mgx_ptr, R, C,
                        ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """g_c [R, C] = scale * (g_y - mg - xhat * mgx) per channel."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < R)[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)[None, :]
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
        mg = tl.load(mg_ptr + cols, mask=cmask, other=0.0)[None, :]
        mgx = tl.load(mgx_ptr + cols, mask=cmask, other=0.0)[None, :]
        xhat = (tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mu) * invstd
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0)
        tl.store(gc_ptr + offs, (scale * (gy - mg - xhat * mgx)).to(gc_ptr.dtype.element_ty), mask=mask)


def _tiles(C: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps): large tiles for the interpreter, GPU-sized otherwise."""
    block_c = min(64, triton.next_power_of_2(C))
    if _INTERPRET:
        return max(16, 16384 // block_c), block_c, 1
    return _GPU_ROWS, block_c, _GPU_WARPS


def _pc(x: Tensor) -> Tensor:
    """A channels_last [T*B, C, H, W] tensor as its [T*B*H*W, C] memory (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _statistics(c: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var) per channel, float64 device tensors, from one pass over c."""
    flat = _pc(c)
    R, C = flat.shape
    rows, block_c, warps = _tiles(C)
    per_program = rows * _STATS_TILES
    programs = triton.cdiv(R, per_program)
    means = torch.empty(programs, C, device=c.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    _stats_kernel[(programs, triton.cdiv(C, block_c))](flat, means, m2s, R, C, TILES=_STATS_TILES, ROWS=rows,
                                                       BLOCK_C=block_c, num_warps=warps)
    counts = (R - torch.arange(programs, device=c.device, dtype=torch.float64) * per_program).clamp(max=per_program)
    means, m2s = means.double(), m2s.double()
    mean = (counts[:, None] * means).sum(0) / R
    m2 = m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
    var = m2 / R
    unbiased = m2 / (R - 1) if R > 1 else torch.full_like(var, float("nan"))
    return mean, torch.rsqrt(var + eps), unbiased


class _BNLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, weight, bias, r, bn: torch.nn.BatchNorm2d, factor, T, lif):
        decay, threshold, soft, alpha, detach = lif
        mean, invstd, unbiased = _statistics(c, bn.eps)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
        a = weight.detach().double() * invstd
        b = bias.detach().double() - mean * a
        a32, b32 = a.float(), b.float()
        out = torch.empty_like(c, memory_format=torch.channels_last)
        C = c.shape[1]
        P = c.shape[0] // T * c.shape[2] * c.shape[3]
        rows, block_c, warps = _tiles(C)
        has_r = r is not None
        _fire_kernel[(triton.cdiv(P, rows), triton.cdiv(C, block_c))](
            _pc(c), _pc(r) if has_r else c, _pc(out), a32, b32, T, P, C, P * C, float(decay),
            float(threshold), HAS_R=has_r, SOFT_RESET=soft, ROWS=rows, BLOCK_C=block_c, num_warps=warps, **_NO_FMA)
        ctx.save_for_backward(c, weight, r if has_r else None, mean.float(), invstd.float(), a32, b32)
        ctx.args = (T, lif)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):
        c, weight, r, mean, invstd, a32, b32 = ctx.saved_tensors
        T, (decay, threshold, soft, alpha, detach) = ctx.args
        C = c.shape[1]
        P = c.shape[0] // T * c.shape[2] * c.shape[3]
        rows, block_c, warps = _tiles(C)
        grid = (triton.cdiv(P, rows), triton.cdiv(C, block_c))
        grad_s = grad_s.contiguous(memory_format=torch.channels_last)
        gy = torch.empty(c.shape, device=c.device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        sums = torch.empty(2, grid[0], C, device=c.device, dtype=torch.float32)
        has_r = r is not None
        _grad_lif_kernel[grid](_pc(c), _pc(r) if has_r else c, _pc(grad_s), _pc(gy), a32, b32, mean,
                               invstd, sums[0], sums[1], T, P, C, P * C, float(decay), float(threshold),
                               float(alpha), HAS_R=has_r, SOFT_RESET=soft, DETACH_RESET=detach, ROWS=rows,
                               BLOCK_C=block_c, num_warps=warps, **_NO_FMA)
        sum_g, sum_gx = sums.double().sum(1)
        count = c.numel() // C
        grad_c = None
        if ctx.needs_input_grad[0]:
            grad_c = torch.empty_like(c, memory_format=torch.channels_last)
            scale = (weight.detach().double() * invstd.double()).float()
            R = c.numel() // C
            _grad_bn_kernel[(triton.cdiv(R, rows), grid[1])](
                _pc(c), _pc(gy), _pc(grad_c), mean, invstd, scale, (sum_g / count).float(),
                (sum_gx / count).float(), R, C, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
        grad_w = sum_gx.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_r = gy.to(r.dtype) if has_r and ctx.needs_input_grad[3] else None
        return grad_c, grad_w, grad_b, grad_r, None, None, None, None


def running_stats_weight(bn: torch.nn.BatchNorm2d) -> float:
    """Advance bn.num_batches_tracked as bn(x) does in training, and return the weight of this
    batch's statistics in the running ones: bn.momentum, or 1 / batches when momentum is None
    (the cumulative average; reading the counter is a host sync, as in nn.BatchNorm2d)."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
    return float(bn.momentum) if bn.momentum is not None else 0.0


def bn_lif_triton(c: Tensor, bn: torch.nn.BatchNorm2d, T: int, decay: float, threshold: float, reset: str,
                  surrogate_alpha: float, detach_reset: bool, residual: Tensor | None = None) -> Tensor:
    """spikes = LIF(bn(c) + residual) for a training-mode affine nn.BatchNorm2d on a channels_last
    c [T*B, C, H, W] (float32, bfloat16 or float16; residual: same shape and layout, or None),
    fused; running statistics and num_batches_tracked update as bn(c) would. Spikes: c's dtype,
    channels_last."""
    if triton is None:
        raise RuntimeError(f"fullrange.kernels.bn_lif: triton is not importable ({_TRITON_ERROR})")
    if c.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("fullrange.kernels.bn_lif: needs a GPU tensor (or TRITON_INTERPRET=1 for tests)")
    factor = running_stats_weight(bn)
    lif = (float(decay), float(threshold), reset == "soft", float(surrogate_alpha), bool(detach_reset))
    return _BNLIF.apply(c, bn.weight, bn.bias, residual, bn, factor, T, lif)
