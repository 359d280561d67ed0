"""BatchNorm (training mode) + optional residual add + multi-step LIF, fused, on the CPU (numba).

For a conv output c [T*B, C, H, W] in channels_last memory, viewed as [T, P, C] (P = B*H*W),
batch statistics over (T, P) per channel, then

    y = c * a + b (+ r),   a = weight * invstd,  b = bias - mean * a
    h_t = decay * v_{t-1} + y_t,  s_t = H(h_t - threshold),  hard / soft reset    (fullrange.neuron)

Passes over memory. Forward: one pass for the statistics (sum and sum of squares in float64),
one pass that reads c (and r) and writes only the spikes; y and h never go to memory. Backward:
one pass recomputes h - threshold per position into a [T, C] buffer, runs the LIF's reverse-time
recurrence (fullrange.kernels.lif_cpu._grad_step, the same formula as the LIF kernel), writes
g_y (= the residual's gradient) and accumulates sum(g_y) and sum(g_y * xhat) per channel; a
second pass turns g_y into BatchNorm's input gradient
    g_c = weight * invstd * (g_y - mean(g_y) - xhat * mean(g_y * xhat)).
Autograd keeps c (and r): no BN output and no LIF state. Running statistics update as
nn.BatchNorm2d does (momentum, or the cumulative average when momentum is None; unbiased
variance), from the float64 statistics.

Numerics: the statistics are float64 sums, ATen's are float accumulations in another order, so
y can differ from nn.BatchNorm2d's in the last bits and a spike can differ where h is within
rounding of the threshold; gradients agree to ~1e-6 (tests/test_bn_lif.py). float32 only, one
thread (the calling thread); fullrange.models.fused decides when it applies.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .batchnorm import running_stats_weight
from .lif_cpu import _NUMBA_ERROR, _grad_constants, _scalars

__all__ = ["bn_lif_cpu"]

COLUMNS = 1024  # columns per chunk (rounded to a multiple of C): the state and d stay in L1/L2

if _NUMBA_ERROR is None:
    from .lif_cpu import _OPTS, _grad_step, _jit, _mul_exact, _reset

    # Every loop runs over a chunk of n consecutive columns of the [T, P*C] view (n a multiple
    # of C), so per-channel values are read from copies repeated to the chunk's length (*_rep)
    # and the innermost loops are long, contiguous and vectorise.

    @_jit(**_OPTS)
    def _stats(c2, n, s_rep, q_rep):
        """Per-column sums and sums of squares (float64, added to s_rep, q_rep [n]) of c2."""
        T, N = c2.shape
        for lo in range(0, N, n):
            m = min(n, N - lo)
            for t in range(T):
                row = c2[t, lo:lo + m]
                for j in range(m):
                    v = np.float64(row[j])
                    s_rep[j] += v
                    q_rep[j] += v * v

    @_jit(**_OPTS)
    def _fire(c2, r2, has_r, n, a_rep, b_rep, out, v, decay, threshold, soft, zero, one):
        """Spikes out [T, P*C] of y = c * a + b (+ r); v: an [n] state buffer."""
        T, N = c2.shape
        for lo in range(0, N, n):
            m = min(n, N - lo)
            for t in range(T):
                row, o = c2[t, lo:lo + m], out[t, lo:lo + m]
                if has_r:
                    rr = r2[t, lo:lo + m]
                    for j in range(m):
                        y = _mul_exact(row[j], a_rep[j]) + b_rep[j] + rr[j]
                        h = y if t == 0 else _mul_exact(decay, v[j]) + y
                        o[j] = one if h >= threshold else zero
                        v[j] = _reset(h, threshold, soft, zero)
                else:
                    for j in range(m):
                        y = _mul_exact(row[j], a_rep[j]) + b_rep[j]
                        h = y if t == 0 else _mul_exact(decay, v[j]) + y
                        o[j] = one if h >= threshold else zero
                        v[j] = _reset(h, threshold, soft, zero)

    @_jit(fastmath={"contract"}, **_OPTS)  # h is recomputed with _mul_exact: never contracted
    def _grad_lif(c2, r2, has_r, gs2, n, a_rep, b_rep, mean_rep, invstd_rep, gy2, sg_rep, sgx_rep, d, g, v,
                  acc_g, acc_gx, decay, threshold, alpha, soft, k1, k2, m_spike, zero, one):
        """g_y [T, P*C] from g_s, recomputing h - threshold into d [T, n] per chunk; adds
        sum(g_y) and sum(g_y * xhat) per column to sg_rep, sgx_rep (float64 [n])."""
        T, N = c2.shape
        for lo in range(0, N, n):
            m = min(n, N - lo)
            for t in range(T):
                row, dt = c2[t, lo:lo + m], d[t]
                for j in range(m):
                    y = _mul_exact(row[j], a_rep[j]) + b_rep[j]
                    if has_r:
                        y = y + r2[t, lo + j]
                    h = y if t == 0 else _mul_exact(decay, v[j]) + y
                    dt[j] = h - threshold
                    v[j] = _reset(h, threshold, soft, zero)
            for j in range(m):
                g[j] = zero
                acc_g[j] = zero
                acc_gx[j] = zero
            for t in range(T - 1, -1, -1):
                row, dt, gst, gyt = c2[t, lo:lo + m], d[t], gs2[t, lo:lo + m], gy2[t, lo:lo + m]
                for j in range(m):
                    gh = _grad_step(gst[j], dt[j], g[j], decay, alpha, k1, k2, m_spike, zero, one)
                    g[j] = gh
                    gyt[j] = gh
                    acc_g[j] += gh
                    acc_gx[j] += gh * ((row[j] - mean_rep[j]) * invstd_rep[j])
            for j in range(m):  # float32 over this chunk's T steps, float64 across chunks
                sg_rep[j] += np.float64(acc_g[j])
                sgx_rep[j] += np.float64(acc_gx[j])

    @_jit(fastmath={"contract"}, **_OPTS)
    def _grad_bn(c2, gy2, n, mean_rep, invstd_rep, scale_rep, mg_rep, mgx_rep, gc2):
        """g_c = scale * (g_y - mg - xhat * mgx) per column (scale = weight * invstd)."""
        T, N = c2.shape
        for lo in range(0, N, n):
            m = min(n, N - lo)
            for t in range(T):
                row, gyt, gct = c2[t, lo:lo + m], gy2[t, lo:lo + m], gc2[t, lo:lo + m]
                for j in range(m):
                    xhat = (row[j] - mean_rep[j]) * invstd_rep[j]
                    gct[j] = scale_rep[j] * (gyt[j] - mg_rep[j] - xhat * mgx_rep[j])


def _chunk(C: int) -> int:
    return C * max(1, COLUMNS // C)


def _rep(values: np.ndarray, n: int, dtype=np.float32) -> np.ndarray:
    """Per-channel values repeated to a chunk of n columns (channels innermost)."""
    return np.tile(values.astype(dtype), n // values.shape[0])


def _fold(per_column: np.ndarray, C: int) -> np.ndarray:
    """Per-column sums [n] -> per-channel sums [C] (float64)."""
    return per_column.reshape(-1, C).sum(0)


def _tpc(x: Tensor, T: int) -> np.ndarray:
    """A channels_last [T*B, C, H, W] tensor as a numpy view [T, B*H*W*C] (memory order)."""
    return x.detach().permute(0, 2, 3, 1).reshape(T, -1).numpy()


def _statistics(c: Tensor, T: int, eps: float):
    """(mean, invstd, unbiased var) per channel, float64 numpy arrays."""
    C = c.shape[1]
    n = _chunk(C)
    s_rep, q_rep = np.zeros(n), np.zeros(n)
    _stats(_tpc(c, T), n, s_rep, q_rep)
    count = c.numel() // C
    mean = _fold(s_rep, C) / count
    var = np.maximum(_fold(q_rep, C) / count - mean * mean, 0.0)
    unbiased = var * count / (count - 1) if count > 1 else np.full(C, np.nan)
    return mean, 1.0 / np.sqrt(var + eps), unbiased


class _BNLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, weight, bias, r, bn: torch.nn.BatchNorm2d, factor, T, lif):
        decay, threshold, soft, alpha, detach = lif
        mean, invstd, unbiased = _statistics(c, T, bn.eps)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.running_mean.mul_(1 - factor).add_(torch.from_numpy(mean).float(), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(torch.from_numpy(unbiased).float(), alpha=factor)
        a32 = (weight.detach().double().numpy() * invstd).astype(np.float32)
        b32 = (bias.detach().double().numpy() - mean * a32).astype(np.float32)
        out = torch.empty_like(c, memory_format=torch.channels_last)
        has_r = r is not None
        r2 = _tpc(r, T) if has_r else np.empty((0, 0), np.float32)
        decay_, threshold_, zero, one = _scalars(torch.float32, decay, threshold, 0.0, 1.0)
        n = _chunk(c.shape[1])
        _fire(_tpc(c, T), r2, has_r, n, _rep(a32, n), _rep(b32, n), _tpc(out, T), np.empty(n, np.float32),
              decay_, threshold_, soft, zero, one)
        ctx.save_for_backward(c, weight, r if has_r else None)
        ctx.stats = (mean.astype(np.float32), invstd.astype(np.float32), a32, b32)
        ctx.args = (T, lif)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):
        c, weight, r = ctx.saved_tensors
        mean, invstd, a32, b32 = ctx.stats
        T, (decay, threshold, soft, alpha, detach) = ctx.args
        C = c.shape[1]
        grad_s = grad_s.contiguous(memory_format=torch.channels_last).float()
        gy = torch.empty_like(c, memory_format=torch.channels_last)
        n = _chunk(C)
        sg_rep, sgx_rep = np.zeros(n), np.zeros(n)
        k1, k2, m_spike = _grad_constants(threshold, soft, detach)
        f = _scalars(torch.float32, decay, threshold, alpha, k1, k2, m_spike, 0.0, 1.0)
        has_r = r is not None
        r2 = _tpc(r, T) if has_r else np.empty((0, 0), np.float32)
        mean_rep, invstd_rep = _rep(mean, n), _rep(invstd, n)
        _grad_lif(_tpc(c, T), r2, has_r, _tpc(grad_s, T), n, _rep(a32, n), _rep(b32, n), mean_rep, invstd_rep,
                  _tpc(gy, T), sg_rep, sgx_rep, np.empty((T, n), np.float32), *(np.empty(n, np.float32) for _ in range(4)),
                  f[0], f[1], f[2], soft, f[3], f[4], f[5], f[6], f[7])
        sum_g, sum_gx = _fold(sg_rep, C), _fold(sgx_rep, C)
        count = c.numel() // C
        grad_c = None
        if ctx.needs_input_grad[0]:  # not in place over g_y: LLVM's vector loop refuses overlapping
            grad_c = torch.empty_like(gy)  # arrays (the in-place pass ran scalar, 2.7x slower)
            scale = weight.detach().double().numpy() * invstd
            _grad_bn(_tpc(c, T), _tpc(gy, T), n, mean_rep, invstd_rep, _rep(scale, n), _rep(sum_g / count, n),
                     _rep(sum_gx / count, n), _tpc(grad_c, T))
        grad_w = torch.from_numpy(sum_gx).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = torch.from_numpy(sum_g).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_r = gy if has_r and ctx.needs_input_grad[3] else None
        return grad_c, grad_w, grad_b, grad_r, None, None, None, None


def bn_lif_cpu(c: Tensor, bn: torch.nn.BatchNorm2d, T: int, decay: float, threshold: float, reset: str,
               surrogate_alpha: float, detach_reset: bool, residual: Tensor | None = None) -> Tensor:
    """spikes = LIF(bn(c) + residual) for a training-mode nn.BatchNorm2d (affine) on a float32
    channels_last c [T*B, C, H, W] (residual: same shape and layout, or None), fused; the
    running statistics and num_batches_tracked update as bn(c) would. Spikes channels_last."""
    factor = running_stats_weight(bn)
    lif = (float(decay), float(threshold), reset == "soft", float(surrogate_alpha), bool(detach_reset))
    return _BNLIF.apply(c, bn.weight, bn.bias, residual, bn, factor, T, lif)
