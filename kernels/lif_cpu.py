"""Multi-step LIF neuron on the CPU: fused numba kernels wrapped as torch.library custom ops.

Same semantics as ``fullrange.kernels.lif`` (the Triton kernels) and fullrange.neuron's torch
backend, on a time-major tensor x of shape [T, ...] viewed as [T, N]:

    h_t = decay * v_{t-1} + x_t          v_0 = 0, no input decay
    s_t = H(h_t - threshold)             spike when h_t >= threshold
    hard reset: v_t = h_t * (1 - s_t)    soft reset: v_t = h_t - threshold * s_t

Backward (sigmoid surrogate, slope a: sg = a * p * (1 - p), p = sig(a * d), d = h_t - threshold),
in reverse time with g_h_{T+1} = 0:

    hard: g_h_t = g_s_t*sg + decay*g_h_{t+1}*(1 - s_t - h_t*sg)
    soft: g_h_t = g_s_t*sg + decay*g_h_{t+1}*(1 - threshold*sg)
    detach_reset: the bracket becomes (1 - s_t) (hard) or 1 (soft);   g_x_t = g_h_t

Memory. Autograd keeps x itself (no new memory for a contiguous x: 4 B per element-step in
fp32, shared with whoever else holds x) and the backward recomputes h from it, so each
direction is one pass over memory: the forward reads x and writes the spikes; the backward
reads x and g_s and writes g_x (5 element-sized transfers per element-step in all; keeping
h - threshold instead would be 6). Columns (the N axis) are independent. Steps run in blocks of
up to 4 in one loop with the state in registers, so a loop streams up to 4 rows of each array
at once. For T = 1, 2 or 4 (the paper's ImageNet T) the backward recomputes and reverses in the
same loop; for other T it recomputes h - threshold for a chunk of columns into a cache-resident
buffer first. Loops vectorise (AVX2/AVX-512) without fastmath.

Numerics. float32 and float64 only (bf16/fp16 stay on the torch backend); the state is in the
input dtype. The charge is ``decay * v`` then ``+ x`` with two roundings (``_mul_exact``: never
fused into an FMA), so the spikes, and the h - theta the backward recomputes, are bit-identical
to a plain PyTorch loop of the formulas. The gradient code may use FMAs (fastmath "contract"
only): ~1 ulp differences. p * (1 - p) is u / (1 + u)^2 with u = exp(-|a d|), which has no
cancellation (torch's sigmoid_backward loses relative accuracy for |a d| > ~5 and returns 0
beyond ~17). float32 computes exp as 2^w with a degree-5 polynomial (p(1 - p) within 1.1e-6
relative for |a d| < 16 and 2e-7 absolute everywhere); float64 uses numpy's exp.

Threads. With torch.get_num_threads() > 1 and a big enough tensor, the kernels run on torch's
own OpenMP thread team (GOMP_parallel of the OpenMP runtime torch loaded, on a numba cfunc;
threads claim column ranges from an atomic counter), so they never compete with torch's
spinning OpenMP workers the way a second thread pool (numba's) would on a small machine.
Where no such runtime is loaded (a torch without OpenMP) the kernels run on the calling thread.
OMP_NUM_THREADS=1 (one thread per process in multi-process runs) is respected through torch.

Compilation is lazy and cached (numba ``cache=True``: in ``__pycache__`` beside this file, else
in the user cache dir, or NUMBA_CACHE_DIR); where no cache dir is writable the kernels are
compiled per process instead. Public API: ``lif_multistep_cpu``: in eager mode a plain
autograd Function; under torch.compile, fake tensors or torch.func the custom op
``fullrange::lif_cpu_fwd`` (fake and autograd registered, so it traces with fullgraph=True), the
same implementation either way; ``lif_constant_input_cpu`` and ``lif_constant_input_grad_cpu``
for an input that is the same at every step (x[N] read T times, its gradient summed over the
steps in the backward pass; eager only, no autograd: fullrange.models.layers.TimeInvariantUnit);
``cpu_kernel_available()``, ``cpu_kernel_error()`` and ``SUPPORTED_DTYPES``. This module imports
without numba; calling the op without it raises a clear error.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # numba is optional at import time: without it fullrange uses the torch LIF backend.
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import carray, cfunc, njit, types as _nb_types
    from numba.extending import intrinsic, overload

    _NUMBA_ERROR: str | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    numba = None
    _NUMBA_ERROR = f"{type(error).__name__}: {error}"

__all__ = ["lif_multistep_cpu", "lif_constant_input_cpu", "lif_constant_input_grad_cpu", "cpu_kernel_available",
           "cpu_kernel_error", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
PARALLEL_MIN_ELEMENTS = 1 << 16  # T * N below this: run on the calling thread only
CHUNK = 2048  # forward, T not 1/2/4: columns per pass (the carried state, 8 KiB, stays in L1)
BWD_BUFFER_BYTES = 256 << 10  # backward, T not 1/2/4: recomputed h - threshold [T, cols] (L2)
CLAIM_MIN, CLAIM_MAX = 2048, 16384  # columns a thread claims at a time (multiples of 16)
_ALIGN = 16  # column boundaries between threads on 64-byte lines (fp32)

_F32 = np.float32
# exp(y) = 2^w, w = y log2(e), y in [-87, 0], float32: n = round(w), f = w - n in [-1/2, 1/2],
# 2^f by a degree-5 polynomial (relative-error minimax fit, 1.5e-7 with float32 coefficients),
# 2^n assembled from its exponent bits. Rounding w costs up to |w| * 6e-8 relative: p(1 - p)
# measured within 1.1e-6 (relative) for |a d| < 16, 3.9e-6 beyond, always < 2e-7 absolute.
_EXP_MIN = _F32(-87.0)  # e^-87 ~ 1.6e-38: still a normal float, so 2^n is never denormal
_LOG2E = _F32(1.4426950408889634)
_ROUND = _F32(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds to an integer
_C5, _C4, _C3 = _F32(0.001327647129073739), _F32(0.009675541892647743), _F32(0.05550713464617729)
_C2, _C1, _C0 = _F32(0.24022120237350464), _F32(0.6931469440460205), _F32(1.0000001192092896)
_ONE32 = _F32(1.0)
_MANTISSA = _F32(8388608.0)  # 2^23
_BIAS_BITS = _F32(127.0 * 8388608.0)  # the exponent bias, shifted into place

# Slots of the int64 parameter block a threaded task reads (filled by _run).
_P_X, _P_OUT, _P_GX, _P_T, _P_N, _P_CLAIM, _P_NEXT, _P_SLOT, _P_SCRATCH, _P_SLOT_BYTES, \
    _P_G_OFFSET, _P_CHUNK, _P_SOFT, _P_FLOATS, _P_X_ROWS, _P_GD_OFFSET = range(16)
_P_LEN = 16


def cpu_kernel_available() -> bool:
    """True when numba imported (the kernels compile on first use)."""
    return numba is not None


def cpu_kernel_error() -> str | None:
    """Why the kernels are unavailable (numba's import error), or None when they are."""
    return _NUMBA_ERROR


def _sigmoid_slope(z):  # pragma: no cover - replaced by the numba overload below
    """p * (1 - p) with p = sigmoid(z) (numba only)."""
    raise NotImplementedError


def _like(value, witness):  # pragma: no cover - replaced by the numba overload below
    """value converted to witness's float type (numba only)."""
    raise NotImplementedError


if numba is not None:

    def _cached(decorator, fn):
        """decorator(cache=True)(fn), or without a cache where no cache dir is writable."""
        try:
            return decorator(cache=True)(fn)
        except RuntimeError as error:  # "cannot cache function ...: no locator available"
            if "cache" not in str(error):
                raise
            return decorator(cache=False)(fn)

    def _jit(**options):
        return lambda fn: _cached(lambda cache: njit(cache=cache, **options), fn)

    # error_model="numpy": no ZeroDivisionError checks (they would stop vectorisation). No
    # fastmath unless stated: IEEE semantics, no FMA contraction.
    _OPTS = dict(error_model="numpy", nogil=True, boundscheck=False)

    # ------------------------------------------------------------ intrinsics and overloads

    @intrinsic
    def _f32_from_bits_of(typingctx, v):
        """float32 whose bit pattern is the int32 value of v (v holds an exact integer)."""
        if v != _nb_types.float32:
            return None

        def codegen(context, builder, signature, args):
            bits = builder.fptosi(args[0], _llvm_ir.IntType(32))
            return builder.bitcast(bits, _llvm_ir.FloatType())

        return _nb_types.float32(_nb_types.float32), codegen

    @intrinsic
    def _mul_exact(typingctx, a, b):
        """a * b as a plain IEEE multiply. It carries no fast-math flags, so LLVM never fuses it
        with the following add into an FMA, even inside a fastmath={"contract"} function."""
        if not (isinstance(a, _nb_types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            return builder.fmul(args[0], args[1])

        return a(a, b), codegen

    @intrinsic
    def _slot(typingctx, data, k):
        """Pointer to the k-th int64 of the block at data (a void pointer)."""
        def codegen(context, builder, signature, args):
            base = builder.bitcast(args[0], _llvm_ir.IntType(64).as_pointer())
            return builder.gep(base, [args[1]])

        return _nb_types.CPointer(_nb_types.int64)(_nb_types.voidptr, _nb_types.intp), codegen

    @intrinsic
    def _ptr_like(typingctx, address, witness):
        """The integer address as a pointer to witness's float type."""
        if not isinstance(witness, _nb_types.Float):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(witness).as_pointer())

        return _nb_types.CPointer(witness)(_nb_types.int64, witness), codegen

    @intrinsic
    def _fetch_add(typingctx, pointer, value):
        """Atomically add value to *pointer; returns the previous value."""
        def codegen(context, builder, signature, args):
            return builder.atomic_rmw("add", args[0], args[1], "monotonic")

        return _nb_types.int64(_nb_types.CPointer(_nb_types.int64), _nb_types.int64), codegen

    @overload(_like, inline="always")
    def _like_overload(value, witness):
        if witness == _nb_types.float32:
            return lambda value, witness: np.float32(value)
        return lambda value, witness: np.float64(value)

    @overload(_sigmoid_slope, inline="always")
    def _sigmoid_slope_overload(z):
        if z == _nb_types.float32:
            def slope32(z):
                w = max(-abs(z), _EXP_MIN) * _LOG2E
                n = (w + _ROUND) - _ROUND
                f = w - n
                p = _C5
                p = p * f + _C4
                p = p * f + _C3
                p = p * f + _C2
                p = p * f + _C1
                p = p * f + _C0
                u = p * _f32_from_bits_of(n * _MANTISSA + _BIAS_BITS)  # u = exp(-|z|)
                q = _ONE32 + u
                return u / (q * q)
            return slope32
        if z == _nb_types.float64:
            def slope64(z):
                u = np.exp(-abs(z))
                q = 1.0 + u
                return u / (q * q)
            return slope64
        return None

    # ------------------------------------------------------------ forward blocks
    # A block runs 1, 2 or 4 consecutive steps over a range of columns in ONE loop with the
    # state in registers: 2 * steps memory streams at once keep the prefetchers busy (a loop
    # per step, one stream pair at a time, measured up to 2x slower on the backward).

    @_jit(**_OPTS)
    def _block_steps(remaining):
        """Steps in the next block of a multi-block T: 4 while possible, then 2 and 1. (A
        computed value, not a literal, so that numba compiles each block function once.)"""
        return 4 if remaining >= 4 else (2 if remaining >= 2 else 1)

    @_jit(inline="always", **_OPTS)
    def _reset(h, threshold, soft, zero):
        """v after firing: h below threshold; else 0 (hard) or h - threshold (soft)."""
        if h >= threshold:
            return h - threshold if soft else zero
        return h

    @_jit(**_OPTS)
    def _forward_block(x, out, t0, steps, lo, n, out_lo, v, decay, threshold, soft, membrane,
                       single, x_step):
        """Steps t0..t0+steps-1 of columns lo..lo+n of x: writes the spikes or, with
        membrane, h - threshold, to columns out_lo..out_lo+n of out [T, *]. Step t reads row
        t * x_step of x: x[T, N] with x_step 1, or x[1, N] with x_step 0 (an input that is the
        same at every step). A single block covers all of T = 1, 2 or 4 and leaves v alone;
        otherwise blocks have 4, 2 or 1 steps and v[:n] carries the state between them (zeroed
        at t0 == 0: v_0 = 0). membrane and single are literal flags at every call site, so
        numba compiles one variant per combination with the dead branches gone.

        The forward and the backward's recomputation run this code (or _backward_fused, with
        the same expressions): h = decay * v then + x, two roundings (_mul_exact: never an
        FMA), so the same spikes bit for bit. (h_1 = x_1, or 0 * decay + x_1 from a zeroed v:
        the same but for the sign of a zero, which changes neither a spike nor h - threshold.)"""
        zero = threshold - threshold
        one = threshold / threshold
        if t0 == 0 and not single:
            v[:n] = zero
        x0, o0 = x[t0 * x_step, lo:lo + n], out[t0, out_lo:out_lo + n]
        if steps == 1:
            for j in range(n):
                h = x0[j] if single else _mul_exact(decay, v[j]) + x0[j]
                o0[j] = h - threshold if membrane else (one if h >= threshold else zero)
                if not single:
                    v[j] = _reset(h, threshold, soft, zero)
        elif steps == 2:
            x1, o1 = x[(t0 + 1) * x_step, lo:lo + n], out[t0 + 1, out_lo:out_lo + n]
            for j in range(n):
                h = x0[j] if single else _mul_exact(decay, v[j]) + x0[j]
                o0[j] = h - threshold if membrane else (one if h >= threshold else zero)
                h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x1[j]
                o1[j] = h - threshold if membrane else (one if h >= threshold else zero)
                if not single:
                    v[j] = _reset(h, threshold, soft, zero)
        else:
            x1, o1 = x[(t0 + 1) * x_step, lo:lo + n], out[t0 + 1, out_lo:out_lo + n]
            x2, o2 = x[(t0 + 2) * x_step, lo:lo + n], out[t0 + 2, out_lo:out_lo + n]
            x3, o3 = x[(t0 + 3) * x_step, lo:lo + n], out[t0 + 3, out_lo:out_lo + n]
            for j in range(n):
                h = x0[j] if single else _mul_exact(decay, v[j]) + x0[j]
                o0[j] = h - threshold if membrane else (one if h >= threshold else zero)
                h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x1[j]
                o1[j] = h - threshold if membrane else (one if h >= threshold else zero)
                h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x2[j]
                o2[j] = h - threshold if membrane else (one if h >= threshold else zero)
                h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x3[j]
                o3[j] = h - threshold if membrane else (one if h >= threshold else zero)
                if not single:
                    v[j] = _reset(h, threshold, soft, zero)

    @_jit(**_OPTS)
    def _forward_range(x, out, lo, n, out_lo, v, decay, threshold, soft, membrane):
        """All T = out.shape[0] steps of columns lo..lo+n, block by block (see _forward_block);
        x has T rows, or one (an input that is the same at every step)."""
        T = out.shape[0]
        x_step = x.shape[0] // T  # 1, or 0 for a constant input
        if T == 1 or T == 2 or T == 4:
            _forward_block(x, out, lo - lo, T, lo, n, out_lo, v, decay, threshold, soft,
                           membrane, True, x_step)
            return
        t = 0
        while t < T:
            steps = _block_steps(T - t)
            _forward_block(x, out, t, steps, lo, n, out_lo, v, decay, threshold, soft, membrane,
                           False, x_step)
            t += steps

    # ------------------------------------------------------------ backward blocks

    @_jit(inline="always", **_OPTS)
    def _grad_step(gs, d, g_next, decay, alpha, k1, k2, m_spike, zero, one):
        """g_h_t from g_s_t, d = h_t - threshold and g_h_{t+1}, one formula for every mode:
        (g_s - (k1 d + k2) lam g') sg + m lam g', m = m_spike where d >= 0 (spike), else 1."""
        sg = alpha * _sigmoid_slope(alpha * d)
        gn = decay * g_next
        return (gs - (k1 * d + k2) * gn) * sg + (m_spike if d >= zero else one) * gn

    @_jit(inline="always", **_OPTS)
    def _membrane4(x0, x1, x2, x3, decay, threshold, soft, zero):
        """h - threshold of 4 steps from their inputs (v_0 = 0), as the forward charges: a
        backward that recomputes them in registers (_backward_fused; kernels.bn_lif_cpu)."""
        h = x0
        d0 = h - threshold
        h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x1
        d1 = h - threshold
        h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x2
        d2 = h - threshold
        h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x3
        return d0, d1, d2, h - threshold

    @_jit(inline="always", **_OPTS)
    def _reverse4(a0, a1, a2, a3, d0, d1, d2, d3, decay, alpha, k1, k2, m_spike, zero, one):
        """g_h of 4 steps (g_h_5 = 0) from their g_s and h - threshold, in reverse time."""
        g3 = _grad_step(a3, d3, zero, decay, alpha, k1, k2, m_spike, zero, one)
        g2 = _grad_step(a2, d2, g3, decay, alpha, k1, k2, m_spike, zero, one)
        g1 = _grad_step(a1, d1, g2, decay, alpha, k1, k2, m_spike, zero, one)
        return _grad_step(a0, d0, g1, decay, alpha, k1, k2, m_spike, zero, one), g1, g2, g3

    # Gradients only: FMA contraction allowed (~20% less arithmetic; ~1 ulp differences).
    @_jit(fastmath={"contract"}, **_OPTS)
    def _reverse_block(gs, gx, d, t0, steps, lo, n, out_lo, g, decay, alpha, k1, k2, m_spike):
        """g_x for t = t0+steps-1 down to t0 (steps 1, 2 or 4), columns lo..lo+n of g_s and
        d[:, :n], into columns out_lo..out_lo+n of gx. g[:n] holds g_h_{t0+steps} (zeros above
        the last step) and receives g_h_{t0}; within the block the state stays in registers."""
        zero = k2 - k2
        one = alpha / alpha
        t3 = t0 + steps - 1
        a3, d3, o3 = gs[t3, lo:lo + n], d[t3, :n], gx[t3, out_lo:out_lo + n]
        if steps == 1:
            for j in range(n):
                gh = _grad_step(a3[j], d3[j], g[j], decay, alpha, k1, k2, m_spike, zero, one)
                o3[j] = gh
                g[j] = gh
        elif steps == 2:
            a0, d0, o0 = gs[t0, lo:lo + n], d[t0, :n], gx[t0, out_lo:out_lo + n]
            for j in range(n):
                gh = _grad_step(a3[j], d3[j], g[j], decay, alpha, k1, k2, m_spike, zero, one)
                o3[j] = gh
                gh = _grad_step(a0[j], d0[j], gh, decay, alpha, k1, k2, m_spike, zero, one)
                o0[j] = gh
                g[j] = gh
        else:
            a0, d0, o0 = gs[t0, lo:lo + n], d[t0, :n], gx[t0, out_lo:out_lo + n]
            a1, d1, o1 = gs[t0 + 1, lo:lo + n], d[t0 + 1, :n], gx[t0 + 1, out_lo:out_lo + n]
            a2, d2, o2 = gs[t0 + 2, lo:lo + n], d[t0 + 2, :n], gx[t0 + 2, out_lo:out_lo + n]
            for j in range(n):
                gh = _grad_step(a3[j], d3[j], g[j], decay, alpha, k1, k2, m_spike, zero, one)
                o3[j] = gh
                gh = _grad_step(a2[j], d2[j], gh, decay, alpha, k1, k2, m_spike, zero, one)
                o2[j] = gh
                gh = _grad_step(a1[j], d1[j], gh, decay, alpha, k1, k2, m_spike, zero, one)
                o1[j] = gh
                gh = _grad_step(a0[j], d0[j], gh, decay, alpha, k1, k2, m_spike, zero, one)
                o0[j] = gh
                g[j] = gh

    @_jit(**_OPTS)
    def _reverse_range(gs, gx, d, lo, n, out_lo, g, decay, alpha, k1, k2, m_spike):
        """All T steps of columns lo..lo+n in reverse time, block by block (gx's columns from
        out_lo)."""
        g[:n] = 0  # g_h_{T+1} = 0
        t = gs.shape[0]
        while t > 0:
            steps = _block_steps(t)
            t -= steps
            _reverse_block(gs, gx, d, t, steps, lo, n, out_lo, g, decay, alpha, k1, k2, m_spike)

    @_jit(fastmath={"contract"}, **_OPTS)
    def _backward_fused(x, gs, gx, lo, n, decay, threshold, alpha, soft, k1, k2, m_spike):
        """T = 1, 2 or 4, columns lo..lo+n: recompute h - threshold and run the reverse-time
        pass in ONE loop, all in registers: reads x and g_s once, writes g_x once. The charge is
        the forward's expression (_mul_exact: no FMA), so the recomputed spikes are exact."""
        T = x.shape[0]
        zero = threshold - threshold
        one = threshold / threshold
        x0, a0, o0 = x[0, lo:lo + n], gs[0, lo:lo + n], gx[0, lo:lo + n]
        if T == 1:
            for j in range(n):
                o0[j] = _grad_step(a0[j], x0[j] - threshold, zero, decay, alpha, k1, k2,
                                   m_spike, zero, one)
        elif T == 2:
            x1, a1, o1 = x[1, lo:lo + n], gs[1, lo:lo + n], gx[1, lo:lo + n]
            for j in range(n):
                h = x0[j]
                d0 = h - threshold
                h = _mul_exact(decay, _reset(h, threshold, soft, zero)) + x1[j]
                gh = _grad_step(a1[j], h - threshold, zero, decay, alpha, k1, k2, m_spike,
                                zero, one)
                o1[j] = gh
                o0[j] = _grad_step(a0[j], d0, gh, decay, alpha, k1, k2, m_spike, zero, one)
        else:
            x1, a1, o1 = x[1, lo:lo + n], gs[1, lo:lo + n], gx[1, lo:lo + n]
            x2, a2, o2 = x[2, lo:lo + n], gs[2, lo:lo + n], gx[2, lo:lo + n]
            x3, a3, o3 = x[3, lo:lo + n], gs[3, lo:lo + n], gx[3, lo:lo + n]
            for j in range(n):
                d0, d1, d2, d3 = _membrane4(x0[j], x1[j], x2[j], x3[j], decay, threshold, soft, zero)
                g0, g1, g2, g3 = _reverse4(a0[j], a1[j], a2[j], a3[j], d0, d1, d2, d3, decay, alpha, k1,
                                           k2, m_spike, zero, one)
                o0[j], o1[j], o2[j], o3[j] = g0, g1, g2, g3

    # ------------------------------------------------------------ column ranges

    @_jit(**_OPTS)
    def _forward_columns(x, s, start, stop, v, decay, threshold, soft):
        """Spikes s[T, N] of columns start..stop from x[T, N] or x[1, N] (the same input at every
        step). T = 1, 2 or 4 is one block and never touches v; other T carry the state between
        blocks in v, len(v) columns at a time."""
        T = s.shape[0]
        if T == 1 or T == 2 or T == 4:
            _forward_range(x, s, start, stop - start, start, v, decay, threshold, soft, False)
            return
        for lo in range(start, stop, v.shape[0]):
            _forward_range(x, s, lo, min(v.shape[0], stop - lo), lo, v, decay, threshold, soft,
                           False)

    @_jit(**_OPTS)
    def _backward_columns(x, gs, gx, start, stop, d, gd, g, decay, threshold, alpha, soft, k1, k2,
                          m_spike):
        """g_x of columns start..stop from g_s[T, N] and x[T, N] (g_x [T, N]), or from x[1, N],
        an input that is the same at every step (g_x[1, N]: the sum of the T steps' gradients).
        T = 1, 2 or 4 with x[T, N]: one fused loop (d, gd and g unused). Otherwise d.shape[1]
        columns at a time: recompute h - threshold for all T steps into d (cache resident), then
        run the reverse pass over it, into g_x or, for a constant input, into gd, summed over
        the steps afterwards; g carries the state between blocks."""
        T = gs.shape[0]
        if x.shape[0] == T and (T == 1 or T == 2 or T == 4):
            _backward_fused(x, gs, gx, start, stop - start, decay, threshold, alpha, soft, k1,
                            k2, m_spike)
            return
        col0 = start - start  # a computed 0: a literal would compile another specialisation
        for lo in range(start, stop, d.shape[1]):
            n = min(d.shape[1], stop - lo)
            _forward_range(x, d, lo, n, col0, g, decay, threshold, soft, True)
            if x.shape[0] == T:
                _reverse_range(gs, gx, d, lo, n, lo, g, decay, alpha, k1, k2, m_spike)
                continue
            _reverse_range(gs, gd, d, lo, n, col0, g, decay, alpha, k1, k2, m_spike)
            out = gx[0, lo:lo + n]
            out[:] = gd[0, :n]
            for t in range(1, T):
                row = gd[t, :n]
                for j in range(n):
                    out[j] += row[j]

    @_jit(**_OPTS)
    def _membrane(x, d, decay, threshold, soft):
        """d = h - threshold of every step, as the backward recomputes it (tests)."""
        v = np.empty(x.shape[1], x.dtype)
        start = x.shape[1] - x.shape[1]
        _forward_range(x, d, start, x.shape[1], start, v, decay, threshold, soft, True)

    # ------------------------------------------------------------ threaded tasks
    # Run by every thread of an OpenMP team (GOMP_parallel) through a cfunc: take a scratch
    # slot, then claim column ranges from an atomic counter until none is left (threads that
    # get less CPU on a shared machine simply claim fewer ranges).

    @_jit(**_OPTS)
    def _forward_task(data, witness):
        p = carray(_slot(data, 0), _P_LEN)
        f = carray(_ptr_like(p[_P_FLOATS], 0.0), 8)
        T, N, claim = p[_P_T], p[_P_N], p[_P_CLAIM]
        x = carray(_ptr_like(p[_P_X], witness), (p[_P_X_ROWS], N))
        s = carray(_ptr_like(p[_P_OUT], witness), (T, N))
        slot = _fetch_add(_slot(data, _P_SLOT), 1)
        v = carray(_ptr_like(p[_P_SCRATCH] + slot * p[_P_SLOT_BYTES], witness), p[_P_CHUNK])
        decay, threshold = _like(f[0], witness), _like(f[1], witness)
        while True:
            lo = _fetch_add(_slot(data, _P_NEXT), claim)
            if lo >= N:
                break
            _forward_columns(x, s, lo, min(N, lo + claim), v, decay, threshold, p[_P_SOFT] != 0)

    @_jit(**_OPTS)
    def _backward_task(data, witness):
        p = carray(_slot(data, 0), _P_LEN)
        f = carray(_ptr_like(p[_P_FLOATS], 0.0), 8)
        T, N, claim, chunk = p[_P_T], p[_P_N], p[_P_CLAIM], p[_P_CHUNK]
        x = carray(_ptr_like(p[_P_X], witness), (p[_P_X_ROWS], N))
        gs = carray(_ptr_like(p[_P_OUT], witness), (T, N))
        gx = carray(_ptr_like(p[_P_GX], witness), (p[_P_X_ROWS], N))
        slot = p[_P_SCRATCH] + _fetch_add(_slot(data, _P_SLOT), 1) * p[_P_SLOT_BYTES]
        d = carray(_ptr_like(slot, witness), (T, chunk))
        gd = carray(_ptr_like(slot + p[_P_GD_OFFSET], witness), (T, chunk))
        g = carray(_ptr_like(slot + p[_P_G_OFFSET], witness), chunk)
        decay, threshold, alpha = _like(f[0], witness), _like(f[1], witness), _like(f[2], witness)
        k1, k2, m_spike = _like(f[3], witness), _like(f[4], witness), _like(f[5], witness)
        while True:
            lo = _fetch_add(_slot(data, _P_NEXT), claim)
            if lo >= N:
                break
            _backward_columns(x, gs, gx, lo, min(N, lo + claim), d, gd, g, decay, threshold, alpha,
                              p[_P_SOFT] != 0, k1, k2, m_spike)

    # One plain function per task and dtype: numba caches a cfunc by its Python function.
    def _forward_task_f32(data):
        _forward_task(data, np.float32(0.0))

    def _forward_task_f64(data):
        _forward_task(data, np.float64(0.0))

    def _backward_task_f32(data):
        _backward_task(data, np.float32(0.0))

    def _backward_task_f64(data):
        _backward_task(data, np.float64(0.0))

    _TASK_FUNCTIONS = {("fwd", torch.float32): _forward_task_f32,
                       ("fwd", torch.float64): _forward_task_f64,
                       ("bwd", torch.float32): _backward_task_f32,
                       ("bwd", torch.float64): _backward_task_f64}


# ---------------------------------------------------------------- host side

_TASKS: dict = {}  # (direction, dtype) -> compiled cfunc, built on first use
_OPENMP: list = []  # [GOMP_parallel or None], looked up once


def _gomp_parallel():
    """GOMP_parallel of the OpenMP runtime torch has loaded, or None (then: one thread).

    GOMP_parallel(fn, data, n, 0) runs fn(data) on n threads of the calling thread's OpenMP
    team, the same team torch's own parallel loops use. Only a runtime that is already loaded
    is used (RTLD_NOLOAD), never a second one.
    """
    if not _OPENMP:
        _OPENMP.append(_find_gomp_parallel())
    return _OPENMP[0]


def _find_gomp_parallel():
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    # torch's own copy first (it may be renamed, e.g. libgomp-a34b3233.so.1), then common names
    names = []
    if sys.platform.startswith("linux"):
        torch_lib = os.path.dirname(os.path.realpath(torch.__file__))
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/" in line}
        except OSError:
            paths = set()
        names += sorted((p for p in paths if "omp" in os.path.basename(p)),
                        key=lambda p: not os.path.realpath(p).startswith(torch_lib))
    names += ["libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so", "libomp.dylib",
              "libiomp5.dylib"]
    for name in names:
        try:
            lib = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
            fn = lib.GOMP_parallel
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        return fn
    return None


def _task(direction: str, dtype: torch.dtype):
    key = (direction, dtype)
    if key not in _TASKS:
        _TASKS[key] = _cached(lambda cache: cfunc(_nb_types.void(_nb_types.voidptr),
                                                   cache=cache, **_OPTS),
                              _TASK_FUNCTIONS[key])
    return _TASKS[key]


def _check_runnable(x: Tensor) -> None:
    if numba is None:
        raise RuntimeError(
            f"fullrange.kernels.lif_cpu: numba is not importable ({_NUMBA_ERROR}); install numba "
            "or use the LIF backend 'torch'."
        )
    if x.device.type != "cpu":
        raise RuntimeError(
            f"fullrange.kernels.lif_cpu: the CPU LIF kernel needs a CPU tensor, got one on "
            f"{x.device}; use the LIF backend 'auto' or 'triton' on GPU."
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fullrange.kernels.lif_cpu: x must be float32 or float64, got {x.dtype} "
            "(half/bf16 run on the LIF backend 'torch')"
        )


def _numpy_2d(x: Tensor) -> np.ndarray:
    """Zero-copy [T, N] numpy view of a contiguous, non-empty CPU tensor [T, ...]."""
    t = x.shape[0]
    return x.detach().view(t, x.numel() // t).numpy()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _plan(t: int, n: int):
    """(threads, columns per claim): torch's thread count, while each thread gets >= 1 claim."""
    threads = torch.get_num_threads()
    if threads < 2 or t * n < PARALLEL_MIN_ELEMENTS or _gomp_parallel() is None:
        return 1, n
    claim = min(CLAIM_MAX, max(CLAIM_MIN, _round_up(-(-n // (4 * threads)), _ALIGN)))
    return max(1, min(threads, -(-n // claim))), claim


def _bwd_chunk(rows: int, n: int, itemsize: int) -> int:
    """Backward, T > 4 or a constant input: columns per buffer of `rows` rows (BWD_BUFFER_BYTES)."""
    return max(_ALIGN, min(_round_up(n, _ALIGN), BWD_BUFFER_BYTES // (rows * itemsize) // _ALIGN * _ALIGN))


def _run(direction: str, dtype: torch.dtype, threads: int, ints: dict, floats, scratch_bytes: int):
    """Run a task on `threads` threads of torch's OpenMP team; the arrays must stay alive."""
    scratch = np.empty(threads * scratch_bytes // 8 + 1, np.float64)  # 8-byte aligned slots
    params = np.zeros(_P_LEN, np.int64)
    floats = np.asarray(floats, np.float64)
    for slot, value in ints.items():
        params[slot] = value
    params[_P_SCRATCH] = scratch.ctypes.data
    params[_P_SLOT_BYTES] = scratch_bytes
    params[_P_FLOATS] = floats.ctypes.data
    _gomp_parallel()(_task(direction, dtype).address, params.ctypes.data, threads, 0)


def _grad_constants(threshold: float, soft_reset: bool, detach_reset: bool) -> tuple[float, float, float]:
    """(k1, k2, m_spike) of _grad_step: one formula for the four reset modes."""
    return (0.0 if soft_reset or detach_reset else 1.0, 0.0 if detach_reset else threshold,
            1.0 if soft_reset else 0.0)


def _scalars(dtype: torch.dtype, *values: float):
    cast = np.float32 if dtype == torch.float32 else np.float64
    return tuple(cast(v) for v in values)


def _forward_impl(x: Tensor, decay: float, threshold: float, soft_reset: bool, steps: int = 0) -> Tensor:
    """Spikes of a CPU float32/float64 x [T, ...] (contiguous result). Reads x, writes spikes.
    With steps > 0, x [1, ...] is the input at every one of `steps` steps: spikes [steps, ...]."""
    _check_runnable(x)
    x = x.contiguous()
    spikes = torch.empty((steps or x.shape[0], *x.shape[1:]), dtype=x.dtype)
    if x.numel() == 0:
        return spikes
    x2, s2 = _numpy_2d(x), _numpy_2d(spikes)
    t, n = s2.shape
    chunk = min(CHUNK, _round_up(n, _ALIGN))
    threads, claim = _plan(t, n)
    if threads > 1:
        ints = {_P_X: x2.ctypes.data, _P_X_ROWS: x2.shape[0], _P_OUT: s2.ctypes.data, _P_T: t, _P_N: n,
                _P_CLAIM: claim, _P_CHUNK: chunk, _P_SOFT: int(soft_reset)}
        _run("fwd", x.dtype, threads, ints, (decay, threshold), chunk * x.element_size())
    else:
        v = np.empty(chunk, x2.dtype)
        _forward_columns(x2, s2, 0, n, v, *_scalars(x.dtype, decay, threshold), soft_reset)
    return spikes


def _backward_impl(grad_spikes: Tensor, x: Tensor, decay: float, threshold: float,
                   soft_reset: bool, surrogate_alpha: float, detach_reset: bool) -> Tensor:
    """dL/dx (shape and dtype of x) from dL/ds [T, ...] and the forward's input x: x [T, ...],
    or x [1, ...] for an input that was the same at every step (then dL/dx sums the T steps'
    gradients). Reads x and dL/ds, writes dL/dx; h - threshold is recomputed (the same code as
    the forward, so the same spikes) and never goes to memory (T > 4 or a constant input: to a
    cache-sized buffer)."""
    _check_runnable(x)
    x = x.contiguous()
    grad_spikes = grad_spikes.to(x.dtype).contiguous()
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    x2, gs2, gx2 = _numpy_2d(x), _numpy_2d(grad_spikes), _numpy_2d(grad_x)
    t, n = gs2.shape
    rows, size = x2.shape[0], x.element_size()
    k1, k2, m_spike = _grad_constants(threshold, soft_reset, detach_reset)
    floats = (decay, threshold, surrogate_alpha, k1, k2, m_spike)
    # scratch per thread: d and gd [t, chunk] (gd: a constant input's per-step gradients), g [chunk]
    chunk = _ALIGN if rows == t and t in (1, 2, 4) else _bwd_chunk(t if rows == t else 2 * t, n, size)
    threads, claim = _plan(t, n)
    if threads > 1:
        ints = {_P_X: x2.ctypes.data, _P_X_ROWS: rows, _P_OUT: gs2.ctypes.data, _P_GX: gx2.ctypes.data,
                _P_T: t, _P_N: n, _P_CLAIM: claim, _P_CHUNK: chunk, _P_SOFT: int(soft_reset),
                _P_GD_OFFSET: t * chunk * size, _P_G_OFFSET: 2 * t * chunk * size}
        _run("bwd", x.dtype, threads, ints, floats, (2 * t + 1) * chunk * size)
    else:
        d, gd, g = np.empty((t, chunk), x2.dtype), np.empty((t, chunk), x2.dtype), np.empty(chunk, x2.dtype)
        decay_, threshold_, alpha_, k1_, k2_, m_ = _scalars(x.dtype, *floats)
        _backward_columns(x2, gs2, gx2, 0, n, d, gd, g, decay_, threshold_, alpha_, soft_reset, k1_,
                          k2_, m_)
    return grad_x


# ---------------------------------------------------------------- the op: torch.library (compile)


@torch.library.custom_op("fullrange::lif_cpu_fwd", mutates_args=(), device_types="cpu")
def _lif_cpu_fwd(
    x: Tensor,
    decay: float,
    threshold: float,
    soft_reset: bool,
    surrogate_alpha: float,
    detach_reset: bool,
) -> Tensor:
    """Forward: spikes, shaped and typed like x (contiguous). surrogate_alpha and detach_reset
    are unused here; they are inputs so that the registered backward can read them."""
    return _forward_impl(x, decay, threshold, soft_reset)


@_lif_cpu_fwd.register_fake
def _lif_cpu_fwd_fake(x, decay, threshold, soft_reset, surrogate_alpha, detach_reset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fullrange::lif_cpu_bwd", mutates_args=(), device_types="cpu")
def _lif_cpu_bwd(
    grad_spikes: Tensor,
    x: Tensor,
    decay: float,
    threshold: float,
    soft_reset: bool,
    surrogate_alpha: float,
    detach_reset: bool,
) -> Tensor:
    """Backward: dL/dx from dL/ds and the forward's input x (see _backward_impl)."""
    return _backward_impl(grad_spikes, x, decay, threshold, soft_reset, surrogate_alpha,
                          detach_reset)


@_lif_cpu_bwd.register_fake
def _lif_cpu_bwd_fake(grad_spikes, x, decay, threshold, soft_reset, surrogate_alpha, detach_reset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, decay, threshold, soft_reset, surrogate_alpha, detach_reset = inputs
    ctx.params = (decay, threshold, soft_reset, surrogate_alpha, detach_reset)
    ctx.save_for_backward(x)  # the input itself: no new memory when x is contiguous


def _backward(ctx, grad_spikes):
    (x,) = ctx.saved_tensors
    if grad_spikes is None:
        grad_spikes = torch.zeros_like(x)
    grad_x = _lif_cpu_bwd(grad_spikes, x, *ctx.params)
    return grad_x, None, None, None, None, None


_lif_cpu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- the same, eager fast path


class _LIFCPUFunction(torch.autograd.Function):
    """Eager mode: the same implementation without the custom op's dispatch layers (which cost
    ~0.1 ms per forward + backward, noticeable on small layers). Autograd keeps x."""

    @staticmethod
    def forward(ctx, x, decay, threshold, soft_reset, surrogate_alpha, detach_reset):
        ctx.params = (decay, threshold, soft_reset, surrogate_alpha, detach_reset)
        ctx.save_for_backward(x)
        return _forward_impl(x, decay, threshold, soft_reset)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes):
        (x,) = ctx.saved_tensors
        return _backward_impl(grad_spikes, x, *ctx.params), None, None, None, None, None


def _eager(x: Tensor) -> bool:
    """A plain tensor outside torch.compile / torch.func: the fast path may run it."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


# ---------------------------------------------------------------- public entry point


def lif_input_grad_cpu(grad_spikes: Tensor, x: Tensor, decay: float, threshold: float, reset: str,
                       surrogate_alpha: float, detach_reset: bool) -> Tensor:
    """dL/dx of lif_multistep_cpu from its input x [T, ...] and dL/dspikes, without a forward:
    the kernel's backward, which recomputes h from x (for callers that kept x and not the graph,
    e.g. the spikes_1bit neuron unit). Contiguous, x's shape and dtype."""
    return _backward_impl(grad_spikes, x, float(decay), float(threshold), reset == "soft",
                          float(surrogate_alpha), bool(detach_reset))


def lif_constant_input_cpu(x: Tensor, steps: int, decay: float, threshold: float, reset: str) -> Tensor:
    """Spikes [steps, *x.shape] of lif_multistep_cpu on x[...] repeated `steps` times, without
    the repeat: every column reads x once. Values only (no autograd); the gradient is
    lif_constant_input_grad_cpu."""
    _check_reset(reset)
    return _forward_impl(x.unsqueeze(0), float(decay), float(threshold), reset == "soft", int(steps))


def lif_constant_input_grad_cpu(grad_spikes: Tensor, x: Tensor, decay: float, threshold: float, reset: str,
                                surrogate_alpha: float, detach_reset: bool) -> Tensor:
    """dL/dx[...] of lif_constant_input_cpu(x, T, ...) from x and dL/dspikes [T, *x.shape]: the T
    steps' input gradients summed, computed in one pass that recomputes h from x (cache-sized
    buffers, no [T, ...] temporary). Contiguous, x's shape and dtype."""
    _check_reset(reset)
    return _backward_impl(grad_spikes, x.unsqueeze(0), float(decay), float(threshold), reset == "soft",
                          float(surrogate_alpha), bool(detach_reset))[0]


def _check_reset(reset: str) -> None:
    if reset not in ("hard", "soft"):
        raise ValueError(f"fullrange.kernels.lif_cpu: reset must be 'hard' or 'soft', got {reset!r}")


def lif_multistep_cpu(x: Tensor, decay: float, threshold: float, reset: str, surrogate_alpha: float,
                      detach_reset: bool) -> Tensor:
    """Multi-step LIF on a time-major CPU x [T, ...] (float32 or float64); spikes like x.

    decay is lam in h_t = lam * v_{t-1} + x_t, threshold is theta, reset is "hard" or "soft",
    surrogate_alpha is the sigmoid surrogate's slope, detach_reset cuts the gradient through
    the reset. Differentiable w.r.t. x: autograd keeps x itself (no new memory for a contiguous
    x) and the backward recomputes h - theta from it. The result is contiguous.
    """
    _check_reset(reset)
    args = (float(decay), float(threshold), reset == "soft", float(surrogate_alpha),
            bool(detach_reset))
    if not _eager(x):  # torch.compile, fake tensors, torch.func: the registered custom op
        return _lif_cpu_fwd(x, *args)
    if x.requires_grad and torch.is_grad_enabled():
        return _LIFCPUFunction.apply(x, *args)
    return _forward_impl(x, *args[:3])
