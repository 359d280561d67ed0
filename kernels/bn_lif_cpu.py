"""BatchNorm (training) + residual + multi-step LIF on the CPU, fused and exact: numba kernels on
torch's OpenMP team (as kernels.lif_cpu), for channels_last float32/float64 tensors [T*B, C, H, W].

A neuron unit of a spiking block:

    z = bn(c) + fma(e, ae, be)          spikes = LIF(z viewed as [T, ...])

where the residual term is nothing (ae = be = 0), a spike tensor r (e = r, ae = 1, be = 0: r
itself) or the downsample's BatchNorm bn_d(d) (e = d). In memory order each tensor is [T, N]
(N = B*H*W*C), column j in channel j % C. Columns run in tiles of L (a multiple of C near TILE),
so per-channel constants come from tile-long rows of `consts` [12, L] (unit_consts) and every
inner loop is long and contiguous (it vectorises).

bn's output is rebuilt as ATen's CPU BatchNorm computes it: y = fma(c, alpha, beta) with alpha =
invstd * w, beta = fma(-mean, alpha, b) (fullrange.models.unit_cpu checks this build of torch
once, bn_output against aten.native_batch_norm), and y + bn_d(d) rounds as the modules' add. The
LIF is kernels.lif_cpu's code (the same charge expression), so the spikes are the modules' bit
for bit. The batch statistics come from ATen (fullrange.models.unit_cpu).

    unit_forward  one pass: reads c (and e), writes only the spikes.
    unit_grad_z   pass 1 of the backward, per tile: z and h - threshold again, the reverse-time
                  LIF gradient g_z (written once; it is a spike residual's gradient), and the
                  per-column partial sums of g_z, g_z (c - mean) and g_z (d - mean_d) (float64,
                  per thread). T = 4 runs as one loop in registers; other T through
                  cache-resident buffers (lif_cpu's blocked path).
    unit_grad_bn  pass 2: g_c = (g_z - sum / N - (c - mean) k) * invstd * w, k = sum(g_z (c -
                  mean)) invstd^2 / N (ATen's formula), and g_d alike (set_grad_bn fills k etc.);
                  g_c over g_z where no spike residual needs g_z.
Memory traffic per element-step, in tensor-sized words: forward 3 (2 without a residual) plus
ATen's two statistics reads per BatchNorm, backward 7 (mode with bn_d: 9); the modules move 9
(13) forward and 8 (13) backward, and keep bn's output or the LIF's input for the backward.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from .lif_cpu import _cached, _gomp_parallel, _grad_constants, _scalars, numba

__all__ = ["unit_consts", "set_batchnorm", "set_spike_residual", "set_grad_bn", "unit_forward", "unit_grad_z",
           "unit_grad_bn", "bn_output", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
TILE = 2048  # columns per tile: z and h - threshold [T, L] stay in L1/L2
PARALLEL_MIN_ELEMENTS = 1 << 16
# rows of consts [12, L]: bn's alpha, beta; bn_d's alpha, beta; mean, mean_d; then pass 2's
# k, sum / N, invstd * w for bn and for bn_d
_A, _B, _AE, _BE, _M, _ME, _K, _G, _W, _KE, _GE, _WE = range(12)
# slots of the int64 parameter block a task reads
(_Q_C, _Q_E, _Q_GS, _Q_OUT, _Q_OUT_E, _Q_CONSTS, _Q_T, _Q_N, _Q_L, _Q_CLAIM, _Q_NEXT, _Q_SLOT, _Q_SCRATCH,
 _Q_SLOT_BYTES, _Q_FLOATS, _Q_SOFT, _Q_BOTH, _Q_SUMS, _Q_KIND, _Q_DM_OFFSET, _Q_G_OFFSET, _Q_GSB_OFFSET, _Q_HW,
 _Q_CHANNELS, _Q_GS_COLS) = range(25)
_Q_LEN = 25
_FWD, _GRAD_Z, _GRAD_BN, _GRAD_BN_IN_PLACE = 0, 1, 2, 3

if numba is not None:
    from numba import carray, cfunc, types as _nb_types
    from numba.extending import intrinsic

    from .lif_cpu import (_OPTS, _fetch_add, _forward_range, _jit, _like, _membrane4, _mul_exact, _ptr_like, _reset,
                          _reverse4, _reverse_range, _slot)

    @intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (llvm.fma), as ATen's BatchNorm kernels compute it."""
        if not (isinstance(a, _nb_types.Float) and a == b == c):
            return None

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return a(a, b, c), codegen

    @_jit(**_OPTS)
    def _bn_rows(K, residual, mean, var, eps, weight, bias, invstd):
        """K's forward rows of bn (residual: bn_d) for every column j (channel j % C): alpha =
        invstd * w and beta = fma(-mean, alpha, b), the products ATen's BatchNorm forms, and the
        mean; invstd [C] = 1 / sqrt(var + eps) in float64, rounded once, as ATen's."""
        C = mean.shape[0]
        for ch in range(C):
            invstd[ch] = 1.0 / np.sqrt(np.float64(var[ch]) + eps)
        ra, rm = (_AE, _ME) if residual else (_A, _M)
        for j in range(K.shape[1]):
            ch = j % C
            a = invstd[ch] * weight[ch]
            K[ra, j] = a
            K[ra + 1, j] = _fma(-mean[ch], a, bias[ch])
            K[rm, j] = mean[ch]

    @_jit(**_OPTS)
    def _grad_rows(K, residual, partial, n, invstd, weight, grad_w, grad_b):
        """From the threads' partial sums [threads, 3, L]: grad_w = sum(g_z (x - mean)) invstd,
        grad_b = sum(g_z) per channel (float64), and pass 2's rows of bn (residual: bn_d): k =
        sum(g_z (x - mean)) invstd^2 / n, sum(g_z) / n, invstd * w (ATen's formula)."""
        C = invstd.shape[0]
        row = 2 if residual else 1
        grad_w[:] = 0.0
        grad_b[:] = 0.0
        for i in range(partial.shape[0]):
            for j in range(partial.shape[2]):
                grad_b[j % C] += partial[i, 0, j]
                grad_w[j % C] += partial[i, row, j]
        rk = _KE if residual else _K
        for j in range(K.shape[1]):
            ch = j % C
            iv = np.float64(invstd[ch])
            K[rk, j] = grad_w[ch] * iv * iv / n
            K[rk + 1, j] = grad_b[ch] / n
            K[rk + 2, j] = iv * weight[ch]
        for ch in range(C):
            grad_w[ch] *= invstd[ch]

    @_jit(inline="always", **_OPTS)
    def _bn_apply(c, a, b):
        """bn's output c * alpha + beta, rounded once: ATen's BatchNorm kernel on the builds
        checked (fullrange.models.unit_cpu checks this one against it through bn_output)."""
        return _fma(c, a, b)

    @_jit(**_OPTS)
    def _affine_rows(c, K, y):
        """y = bn's output for c, y [R, L] (channel j % C in column j): bn_output's loop."""
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                y[i, j] = _bn_apply(c[i, j], K[_A, j], K[_B, j])

    @_jit(inline="always", **_OPTS)
    def _z(c, e, a, b, ae, be):
        """The LIF input: bn(c) + the residual term (bn_d(d); r with ae = 1, be = 0, exactly r;
        0 with ae = be = 0): the modules' y + r, rounded as they round it."""
        return _bn_apply(c, a, b) + _bn_apply(e, ae, be)

    @_jit(**_OPTS)
    def _load_z(c, e, base, m, K, z):
        """z[:, :m] = the LIF input of columns base..base+m."""
        A, B, AE, BE = K[_A], K[_B], K[_AE], K[_BE]
        for t in range(z.shape[0]):
            ct, et, zt = c[t, base:base + m], e[t, base:base + m], z[t, :m]
            for j in range(m):
                zt[j] = _z(ct[j], et[j], A[j], B[j], AE[j], BE[j])

    @_jit(**_OPTS)
    def _forward_fused4(c, e, s, K, base, m, decay, threshold, soft):
        """T = 4, columns base..base+m in ONE loop, z in registers (kernels.lif_cpu's
        _forward_block for a single block: the same expressions, so the same spikes)."""
        A, B, AE, BE = K[_A], K[_B], K[_AE], K[_BE]
        zero = threshold - threshold
        one = threshold / threshold
        c0, c1, c2, c3 = c[0, base:base + m], c[1, base:base + m], c[2, base:base + m], c[3, base:base + m]
        e0, e1, e2, e3 = e[0, base:base + m], e[1, base:base + m], e[2, base:base + m], e[3, base:base + m]
        s0, s1, s2, s3 = s[0, base:base + m], s[1, base:base + m], s[2, base:base + m], s[3, base:base + m]
        for j in range(m):
            a, b, ae, be = A[j], B[j], AE[j], BE[j]
            h = _z(c0[j], e0[j], a, b, ae, be)
            s0[j] = one if h >= threshold else zero
            h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + _z(c1[j], e1[j], a, b, ae, be)
            s1[j] = one if h >= threshold else zero
            h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + _z(c2[j], e2[j], a, b, ae, be)
            s2[j] = one if h >= threshold else zero
            h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + _z(c3[j], e3[j], a, b, ae, be)
            s3[j] = one if h >= threshold else zero

    @_jit(**_OPTS)
    def _forward_columns(c, e, s, K, start, stop, z, v, decay, threshold, soft):
        """Spikes s[T, start:stop]. T = 4: one loop per tile; other T: z into the cache-resident
        z [T, L], then kernels.lif_cpu's forward on it (v [L]: its state)."""
        L = z.shape[1]
        for base in range(start, stop, L):
            m = min(L, stop - base)
            if s.shape[0] == 4:
                _forward_fused4(c, e, s, K, base, m, decay, threshold, soft)
            else:
                _load_z(c, e, base, m, K, z)
                _forward_range(z, s, 0, m, base, v, decay, threshold, soft, False)

    @_jit(fastmath={"contract"}, **_OPTS)
    def _grad_z_fused4(c, e, gs, gz, K, base, m, gs_base, decay, threshold, alpha, soft, k1, k2, m_spike):
        """T = 4, columns base..base+m in ONE loop, all in registers: z, h - threshold and the
        reverse-time gradient g_z (kernels.lif_cpu._backward_fused with z for its input; the
        same charge expression, so the same spikes). g_s from gs's columns gs_base..gs_base+m."""
        A, B, AE, BE = K[_A], K[_B], K[_AE], K[_BE]
        zero = threshold - threshold
        one = threshold / threshold
        c0, c1, c2, c3 = c[0, base:base + m], c[1, base:base + m], c[2, base:base + m], c[3, base:base + m]
        e0, e1, e2, e3 = e[0, base:base + m], e[1, base:base + m], e[2, base:base + m], e[3, base:base + m]
        lo, hi = gs_base, gs_base + m
        a0, a1, a2, a3 = gs[0, lo:hi], gs[1, lo:hi], gs[2, lo:hi], gs[3, lo:hi]
        o0, o1, o2, o3 = gz[0, base:base + m], gz[1, base:base + m], gz[2, base:base + m], gz[3, base:base + m]
        for j in range(m):
            a, b, ae, be = A[j], B[j], AE[j], BE[j]
            d0, d1, d2, d3 = _membrane4(_z(c0[j], e0[j], a, b, ae, be), _z(c1[j], e1[j], a, b, ae, be),
                                        _z(c2[j], e2[j], a, b, ae, be), _z(c3[j], e3[j], a, b, ae, be),
                                        decay, threshold, soft, zero)
            g0, g1, g2, g3 = _reverse4(a0[j], a1[j], a2[j], a3[j], d0, d1, d2, d3, decay, alpha, k1, k2,
                                       m_spike, zero, one)
            o0[j], o1[j], o2[j], o3[j] = g0, g1, g2, g3

    @_jit(**_OPTS)
    def _add_sums(c, e, gz, K, base, m, sums, both):
        """sums [3, L] += per column, over the steps: g_z, g_z (c - mean), and with both
        g_z (e - mean_e); columns base..base+m, just written (cache-resident). A loop of its
        own: inside the gradient loop the accumulators stopped it vectorising (10x slower)."""
        M, ME = K[_M], K[_ME]
        s0, s1, s2 = sums[0], sums[1], sums[2]
        for t in range(gz.shape[0]):
            gt, ct = gz[t, base:base + m], c[t, base:base + m]
            for j in range(m):
                s0[j] += gt[j]
                s1[j] += gt[j] * (ct[j] - M[j])
            if both:
                et = e[t, base:base + m]
                for j in range(m):
                    s2[j] += gt[j] * (et[j] - ME[j])

    @_jit(**_OPTS)
    def _spread_pool_grad(gp, hw, C, base, m, out):
        """out[:, :m] = the gradient at columns base..base+m of a tensor whose every pixel of
        image b has the gradient gp[:, b*C:(b+1)*C] (a global average pool's, [T, B*C]): pixel
        by pixel, C values at a time (base and m are multiples of C)."""
        q0 = base // C
        for t in range(out.shape[0]):
            src, dst = gp[t], out[t]
            for q in range(m // C):
                b = (q0 + q) // hw
                dst[q * C:(q + 1) * C] = src[b * C:(b + 1) * C]

    @_jit(**_OPTS)
    def _grad_z_columns(c, e, gs, gz, K, start, stop, z, dm, gsb, g, sums, both, hw, C, decay, threshold,
                        alpha, soft, k1, k2, m_spike):
        """g_z [T, start:stop] from g_s, and the per-column sums (added to sums [3, L]). T = 4:
        one loop per tile; other T: z, then h - threshold into cache-resident buffers, then the
        reverse pass (kernels.lif_cpu's blocked path). hw > 0: gs is a pool's gradient [T, B*C]
        (the same at the hw pixels of an image), spread over each tile into gsb [T, L] first."""
        L = z.shape[1]
        for base in range(start, stop, L):
            m = min(L, stop - base)
            src, src_base = gs, base
            if hw > 0:
                _spread_pool_grad(gs, hw, C, base, m, gsb)
                src, src_base = gsb, base - base
            if gz.shape[0] == 4:
                _grad_z_fused4(c, e, src, gz, K, base, m, src_base, decay, threshold, alpha, soft, k1, k2, m_spike)
            else:
                _load_z(c, e, base, m, K, z)
                _forward_range(z, dm, 0, m, 0, g, decay, threshold, soft, True)
                _reverse_range(src, gz, dm, src_base, m, base, g, decay, alpha, k1, k2, m_spike)
            _add_sums(c, e, gz, K, base, m, sums, both)

    @_jit(**_OPTS)
    def _grad_bn_columns(c, e, gz, gc, ge, K, start, stop, L, both):
        """g_c (and, with both, g_e: the downsample BatchNorm's) [T, start:stop] from g_z."""
        M, Kc, G, W = K[_M], K[_K], K[_G], K[_W]
        ME, KE, GE, WE = K[_ME], K[_KE], K[_GE], K[_WE]
        for base in range(start, stop, L):
            m = min(L, stop - base)
            for t in range(gz.shape[0]):
                gt, ct, ot = gz[t, base:base + m], c[t, base:base + m], gc[t, base:base + m]
                for j in range(m):
                    ot[j] = (gt[j] - G[j] - (ct[j] - M[j]) * Kc[j]) * W[j]
                if both:
                    et, oe = e[t, base:base + m], ge[t, base:base + m]
                    for j in range(m):
                        oe[j] = (gt[j] - GE[j] - (et[j] - ME[j]) * KE[j]) * WE[j]

    @_jit(**_OPTS)
    def _grad_bn_in_place(c, e, gz, ge, K, start, stop, L, both):
        """_grad_bn_columns writing g_c over g_z (g_e first, from g_z): no tensor-sized output
        allocated and written besides g_e. Each loop writes one array that it may also read, so
        it vectorises (two arguments aliasing one buffer would make LLVM run the scalar loop)."""
        M, Kc, G, W = K[_M], K[_K], K[_G], K[_W]
        ME, KE, GE, WE = K[_ME], K[_KE], K[_GE], K[_WE]
        for base in range(start, stop, L):
            m = min(L, stop - base)
            for t in range(gz.shape[0]):
                gt, ct = gz[t, base:base + m], c[t, base:base + m]
                if both:
                    et, oe = e[t, base:base + m], ge[t, base:base + m]
                    for j in range(m):
                        oe[j] = (gt[j] - GE[j] - (et[j] - ME[j]) * KE[j]) * WE[j]
                for j in range(m):
                    gt[j] = (gt[j] - G[j] - (ct[j] - M[j]) * Kc[j]) * W[j]

    @_jit(**_OPTS)
    def _task(data, witness):
        """One thread's share of a pass: claim column ranges (multiples of L) until none is left."""
        p = carray(_slot(data, 0), _Q_LEN)
        f = carray(_ptr_like(p[_Q_FLOATS], 0.0), 8)
        T, N, L, claim, kind = p[_Q_T], p[_Q_N], p[_Q_L], p[_Q_CLAIM], p[_Q_KIND]
        c = carray(_ptr_like(p[_Q_C], witness), (T, N))
        e = carray(_ptr_like(p[_Q_E], witness), (T, N))
        gs = carray(_ptr_like(p[_Q_GS], witness), (T, p[_Q_GS_COLS]))
        out = carray(_ptr_like(p[_Q_OUT], witness), (T, N))
        out_e = carray(_ptr_like(p[_Q_OUT_E], witness), (T, N))
        K = carray(_ptr_like(p[_Q_CONSTS], witness), (12, L))
        slot = _fetch_add(_slot(data, _Q_SLOT), 1)
        scratch = p[_Q_SCRATCH] + slot * p[_Q_SLOT_BYTES]
        z = carray(_ptr_like(scratch, witness), (T, L))
        dm = carray(_ptr_like(scratch + p[_Q_DM_OFFSET], witness), (T, L))
        g = carray(_ptr_like(scratch + p[_Q_G_OFFSET], witness), L)
        gsb = carray(_ptr_like(scratch + p[_Q_GSB_OFFSET], witness), (T, L))
        sums = carray(_ptr_like(p[_Q_SUMS] + slot * 3 * L * 8, 0.0), (3, L))
        if kind == _GRAD_Z:
            sums[:, :] = 0.0
        decay, threshold, alpha = _like(f[0], witness), _like(f[1], witness), _like(f[2], witness)
        k1, k2, m_spike = _like(f[3], witness), _like(f[4], witness), _like(f[5], witness)
        soft, both = p[_Q_SOFT] != 0, p[_Q_BOTH] != 0
        while True:
            lo = _fetch_add(_slot(data, _Q_NEXT), claim)
            if lo >= N:
                break
            hi = min(N, lo + claim)
            if kind == _FWD:
                _forward_columns(c, e, out, K, lo, hi, z, g, decay, threshold, soft)
            elif kind == _GRAD_Z:
                _grad_z_columns(c, e, gs, out, K, lo, hi, z, dm, gsb, g, sums, both, p[_Q_HW], p[_Q_CHANNELS], decay,
                                threshold, alpha, soft, k1, k2, m_spike)
            elif kind == _GRAD_BN:
                _grad_bn_columns(c, e, gs, out, out_e, K, lo, hi, L, both)
            else:
                _grad_bn_in_place(c, e, gs, out_e, K, lo, hi, L, both)

    def _task_f32(data):
        _task(data, np.float32(0.0))

    def _task_f64(data):
        _task(data, np.float64(0.0))

    _TASK_FUNCTIONS = {torch.float32: _task_f32, torch.float64: _task_f64}

_TASKS: dict = {}  # dtype -> compiled cfunc


def _compiled_task(dtype: torch.dtype):
    if dtype not in _TASKS:
        _TASKS[dtype] = _cached(lambda cache: cfunc(_nb_types.void(_nb_types.voidptr), cache=cache, **_OPTS),
                                _TASK_FUNCTIONS[dtype])
    return _TASKS[dtype]


def unit_consts(C: int, dtype: torch.dtype) -> np.ndarray:
    """The per-column constants [12, L] of one unit, L = a multiple of C near TILE; every row
    zero until set_batchnorm / set_spike_residual / set_grad_bn fill it."""
    return np.zeros((12, C * max(1, TILE // C)), np.float32 if dtype == torch.float32 else np.float64)


def _np(x: Tensor) -> np.ndarray:
    return x.detach().numpy()


def set_batchnorm(consts: np.ndarray, residual: bool, mean: Tensor, var: Tensor, eps: float, weight: Tensor,
                  bias: Tensor) -> np.ndarray:
    """Fill the rows of bn (residual: of the downsample's bn_d) from its batch mean and biased
    variance [C]; returns invstd [C] (consts' dtype), as aten.native_batch_norm computes it."""
    invstd = np.empty(mean.shape[0], consts.dtype)
    _bn_rows(consts, residual, _np(mean), _np(var), float(eps), _np(weight), _np(bias), invstd)
    return invstd


def set_spike_residual(consts: np.ndarray) -> None:
    """The residual term is a spike tensor r added as it is: fma(r, 1, 0) = r."""
    consts[_AE] = 1


def set_grad_bn(consts: np.ndarray, residual: bool, partial: np.ndarray, n: int, invstd: np.ndarray,
                weight: Tensor) -> tuple[Tensor, Tensor]:
    """Pass 2's rows of bn (residual: bn_d) from unit_grad_z's partial sums; returns bn's
    (weight gradient, bias gradient) [C] float64. n: the elements per channel."""
    grad_w, grad_b = np.empty(invstd.shape[0]), np.empty(invstd.shape[0])
    _grad_rows(consts, residual, partial, float(n), invstd, _np(weight), grad_w, grad_b)
    return torch.from_numpy(grad_w), torch.from_numpy(grad_b)


def _view(x: Tensor | None, T: int) -> np.ndarray | None:
    """[T, N] numpy view, in memory order, of a channels_last [T*B, C, H, W] tensor."""
    return None if x is None else x.detach().permute(0, 2, 3, 1).reshape(T, -1).numpy()


_BUFFERS = threading.local()  # per calling thread: (threads, L, slot bytes) -> (sums, scratch)


def _buffers(threads: int, L: int, slot_bytes: int):
    """The team's partial sums [threads, 3, L] (float64; each thread zeroes its own in pass 1)
    and scratch slots, kept between the calls of one calling thread. pass 1 returns the sums;
    its caller reads them (set_grad_bn) before that thread's next pass 1."""
    cache = _BUFFERS.__dict__.setdefault("by_shape", {})
    key = (threads, L, slot_bytes)
    if key not in cache:
        cache[key] = (np.zeros((threads, 3, L), np.float64), np.empty(threads * slot_bytes // 8 + 1, np.float64))
    return cache[key]


def _launch(kind: int, T: int, consts: np.ndarray, c: np.ndarray, e=None, gs=None, out=None, out_e=None,
            floats=(), soft: bool = False, both: bool = False, hw: int = 0, channels: int = 0) -> np.ndarray:
    """Run a pass over the columns on torch's OpenMP team (or the calling thread); returns the
    per-thread sums [threads, 3, L] (pass 1). Operands not given point at c and are not read.
    hw > 0 (pass 1): gs is a global average pool's gradient [T, B*channels], hw pixels per image."""
    N, L = c.shape[1], consts.shape[1]
    size = c.itemsize
    threads = torch.get_num_threads()
    if threads < 2 or T * N < PARALLEL_MIN_ELEMENTS or _gomp_parallel() is None:
        threads = 1
    tiles = -(-N // L)
    claim = L * max(1, min(8, -(-tiles // (4 * threads))))
    threads = max(1, min(threads, -(-N // claim)))
    slot_bytes = (3 * T + 1) * L * size  # z, h - threshold, a spread pool gradient [T, L]; a state [L]
    sums, scratch = _buffers(threads, L, slot_bytes)
    floats = np.asarray(tuple(floats) + (0.0,) * (8 - len(floats)), np.float64)
    p = np.zeros(_Q_LEN, np.int64)
    for slot, arr in ((_Q_C, c), (_Q_E, e), (_Q_GS, gs), (_Q_OUT, out), (_Q_OUT_E, out_e)):
        p[slot] = (c if arr is None else arr).ctypes.data
    p[_Q_CONSTS], p[_Q_T], p[_Q_N], p[_Q_L], p[_Q_CLAIM] = consts.ctypes.data, T, N, L, claim
    p[_Q_SCRATCH], p[_Q_SLOT_BYTES], p[_Q_DM_OFFSET], p[_Q_GSB_OFFSET], p[_Q_G_OFFSET] = scratch.ctypes.data, \
        slot_bytes, T * L * size, 2 * T * L * size, 3 * T * L * size
    p[_Q_HW], p[_Q_CHANNELS], p[_Q_GS_COLS] = hw, channels, N if gs is None else gs.shape[1]
    p[_Q_FLOATS], p[_Q_SOFT], p[_Q_BOTH], p[_Q_SUMS], p[_Q_KIND] = floats.ctypes.data, int(soft), \
        int(both), sums.ctypes.data, kind
    task = _compiled_task(torch.float32 if c.dtype == np.float32 else torch.float64)
    if threads > 1:
        _gomp_parallel()(task.address, p.ctypes.data, threads, 0)
    else:
        task.ctypes(p.ctypes.data)
    return sums


def unit_forward(c: Tensor, T: int, consts: np.ndarray, decay: float, threshold: float, soft: bool,
                 e: Tensor | None = None) -> Tensor:
    """Spikes [T*B, C, H, W] (channels_last, c's dtype) of the unit. c, and e (the residual: r
    or d), channels_last of one shape and dtype; consts set (set_batchnorm, ...)."""
    spikes = torch.empty_like(c, memory_format=torch.channels_last)
    _launch(_FWD, T, consts, _view(c, T), _view(e, T), out=_view(spikes, T),
            floats=_scalars(c.dtype, decay, threshold), soft=soft)
    return spikes


def unit_grad_z(grad_spikes: Tensor, c: Tensor, T: int, consts: np.ndarray, decay: float, threshold: float,
                soft: bool, surrogate_alpha: float, detach_reset: bool, e: Tensor | None = None,
                residual_bn: bool = False) -> tuple[Tensor, np.ndarray]:
    """Pass 1: (g_z [T*B, C, H, W] channels_last, the threads' partial sums [threads, 3, L] float64
    per column of sum(g_z), sum(g_z (c - mean)) and, with residual_bn (e is a downsample's conv
    output), sum(g_z (e - mean_e)): set_grad_bn reads them). A grad_spikes that is the same at
    every pixel of an image (expanded over H and W: a global average pool's) is read as it is,
    [T*B, C], never spread out in memory."""
    gz = torch.empty_like(c, memory_format=torch.channels_last)
    k1, k2, m_spike = _grad_constants(threshold, soft, detach_reset)
    hw = 0
    if grad_spikes.stride(2) == 0 and grad_spikes.stride(3) == 0:  # broadcast over the pixels
        hw = c.shape[2] * c.shape[3]
        gs = grad_spikes[:, :, 0, 0].to(c.dtype).contiguous().view(T, -1).numpy()
    else:
        gs = _view(grad_spikes.to(c.dtype).contiguous(memory_format=torch.channels_last), T)
    sums = _launch(_GRAD_Z, T, consts, _view(c, T), _view(e, T), gs=gs, out=_view(gz, T),
                   floats=(decay, threshold, surrogate_alpha, k1, k2, m_spike), soft=soft, both=residual_bn, hw=hw,
                   channels=c.shape[1])
    return gz, sums


def unit_grad_bn(gz: Tensor, c: Tensor, T: int, consts: np.ndarray, d: Tensor | None = None,
                 in_place: bool = False) -> tuple[Tensor, Tensor | None]:
    """Pass 2: (g_c, g_d or None) from g_z: BatchNorm's input gradient, and the downsample
    BatchNorm's for its input d (consts: set_grad_bn for each). in_place: g_c is written over g_z
    (when nothing else needs g_z: no spike residual), one tensor-sized buffer less."""
    gd = None if d is None else torch.empty_like(d, memory_format=torch.channels_last)
    if in_place:
        _launch(_GRAD_BN_IN_PLACE, T, consts, _view(c, T), _view(d, T), gs=_view(gz, T), out_e=_view(gd, T),
                both=d is not None)
        return gz, gd
    gc = torch.empty_like(c, memory_format=torch.channels_last)
    _launch(_GRAD_BN, T, consts, _view(c, T), _view(d, T), gs=_view(gz, T), out=_view(gc, T), out_e=_view(gd, T),
            both=d is not None)
    return gc, gd


def bn_output(c: Tensor, consts: np.ndarray) -> Tensor:
    """bn(c) as the fused passes compute it (set_batchnorm): for checking that it equals ATen's
    BatchNorm output on this build. c: channels_last."""
    y = torch.empty_like(c, memory_format=torch.channels_last)
    C = c.shape[1]
    _affine_rows(_view(c, 1).reshape(-1, C), consts, _view(y, 1).reshape(-1, C))
    return y
