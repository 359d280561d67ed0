"""Multi-step LIF neuron: Triton forward/backward kernels and a torch.library custom op.

Semantics (PAPER.md, "LIF neuron"), on a time-major tensor x of shape [T, ...]:

    h_t = decay * v_{t-1} + x_t          v_0 = 0, no input decay
    s_t = H(h_t - threshold)             spike when h_t >= threshold
    hard reset: v_t = h_t * (1 - s_t)    soft reset: v_t = h_t - threshold * s_t

Backward (sigmoid surrogate of slope a = surrogate_alpha, sg = a*sig(a*d)*(1 - sig(a*d)),
d = h_t - threshold), in reverse time with g_h_{T+1} = 0:

    hard: g_h_t = g_s_t*sg + decay*g_h_{t+1}*(1 - s_t - h_t*sg)
    soft: g_h_t = g_s_t*sg + decay*g_h_{t+1}*(1 - threshold*sg)
    detach_reset: the bracket becomes (1 - s_t) (hard) or 1 (soft);   g_x_t = g_h_t

Memory traffic per element-step: the forward reads x and writes s and d = h - threshold (all in
x's dtype; d only when a backward will need it), the backward reads g_s and d and writes g_x.
Spikes are recomputed in the backward from the sign bit of the stored d, so they agree with
the forward's spikes even where rounding d to bf16/fp16 gives a signed zero. State (v, g_h)
lives in fp32 registers for every input dtype. T and N are runtime values: one compiled
kernel serves every T; N only selects between Triton's usual "divisible by 16" variants.

Public API: ``lif_multistep_triton(x, decay, threshold, reset, surrogate_alpha, detach_reset)``.
It is a ``torch.library`` custom op (fake + autograd registered), so it traces under
torch.compile and works under DDP like any other op. Kernels run on CUDA tensors, or on CPU
tensors when ``TRITON_INTERPRET=1`` was set before this module was imported (for tests).
This module imports without triton; calling the op without it raises a clear error.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # triton is optional at import time (the op then raises a clear error when called)
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except Exception as error:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _TRITON_ERROR = f"{type(error).__name__}: {error}"

__all__ = ["lif_multistep_triton", "triton_available", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Read once: triton.jit returns interpreted (CPU) functions only if this was set at decoration.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Launch shape on a GPU: 1024 elements per program, 4 warps -> 8 consecutive elements per
# thread (two 16-byte fp32 loads, one 16-byte bf16 load). Not tuned on hardware yet.
_GPU_BLOCK = 1024
_GPU_WARPS = 4
# The interpreter pays per program and per op, not per element: use few, large blocks.
_INTERPRET_MAX_BLOCK = 16384


def triton_available() -> bool:
    """True when triton imported (it may still lack a GPU; see the module docstring)."""
    return triton is not None


if triton is not None:

    @triton.jit(do_not_specialize=["T"])
    def _lif_fwd_kernel(
        x_ptr, s_ptr, d_ptr,  # [T, N] contiguous; s and d have x's dtype
        T, N,  # runtime sizes
        decay, threshold,  # fp32 runtime scalars
        SOFT_RESET: tl.constexpr,
        STORE_D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x_ptrs = x_ptr + offs
        s_ptrs = s_ptr + offs
        d_ptrs = d_ptr + offs
        v = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(T):
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            h = decay * v + x
            d = h - threshold
            spike = d >= 0.0
            s = tl.where(spike, 1.0, 0.0)
            tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=mask)
            if STORE_D:
                tl.store(d_ptrs, d.to(d_ptr.dtype.element_ty), mask=mask)
            if SOFT_RESET:
                v = h - threshold * s
            else:
                v = tl.where(spike, 0.0, h)
            x_ptrs += N  # 64-bit pointer arithmetic: no int32 overflow of t * N
            s_ptrs += N
            d_ptrs += N

    @triton.jit
    def lif_grad_step(gs, d, g_next, decay, threshold, alpha, SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr):
        """g_h_t (float32) from g_s_t, d = h_t - threshold (float32) and g_h_{t+1}: the backward
        of the module docstring, shared with fullrange.kernels.bn_lif."""
        sig = tl.sigmoid(alpha * d)
        sg = alpha * sig * (1.0 - sig)
        if SOFT_RESET:
            if DETACH_RESET:
                carry = decay * g_next
            else:
                carry = decay * g_next * (1.0 - threshold * sg)
        else:
            # Spike = sign bit clear (d >= +0): a negative d rounded to -0 stays "no spike".
            spike = d.to(tl.int32, bitcast=True) >= 0
            not_s = tl.where(spike, 0.0, 1.0)
            if DETACH_RESET:
                carry = decay * g_next * not_s
            else:
                carry = decay * g_next * (not_s - (d + threshold) * sg)
        return gs * sg + carry

    @triton.jit(do_not_specialize=["T", "last_offset"])
    def _lif_bwd_kernel(
        gs_ptr, d_ptr, gx_ptr,  # [T, N] contiguous
        T, N, last_offset,  # last_offset = (T - 1) * N, computed on the host
        decay, threshold, alpha,
        SOFT_RESET: tl.constexpr,
        DETACH_RESET: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        gs_ptrs = gs_ptr + last_offset + offs
        d_ptrs = d_ptr + last_offset + offs
        gx_ptrs = gx_ptr + last_offset + offs
        g_next = tl.zeros([BLOCK], dtype=tl.float32)  # g_h_{t+1}
        for _ in range(T):
            gs = tl.load(gs_ptrs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
            g = lif_grad_step(gs, d, g_next, decay, threshold, alpha, SOFT_RESET, DETACH_RESET)
            tl.store(gx_ptrs, g.to(gx_ptr.dtype.element_ty), mask=mask)
            g_next = g
            gs_ptrs -= N
            d_ptrs -= N
            gx_ptrs -= N


def _check_runnable(x: Tensor) -> None:
    if triton is None:
        raise RuntimeError(
            "fullrange.kernels.lif: triton is not importable "
            f"({_TRITON_ERROR}); install triton or use the LIF backend 'torch'."
        )
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError(
            "fullrange.kernels.lif: the Triton LIF kernel needs a GPU tensor; got a CPU tensor. "
            "Use the LIF backend 'torch' on CPU (or set TRITON_INTERPRET=1 before importing "
            "fullrange.kernels.lif, for tests)."
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fullrange.kernels.lif: x must be float32, bfloat16 or float16, got {x.dtype}")


# No fused multiply-add in the forward: h = decay * v + x rounds like torch's separate mul and
# add, so spikes match the torch LIF backend bit for bit (free in a memory-bound kernel).
_NO_FMA = {"enable_fp_fusion": False}


def _launch_config(n: int) -> tuple[int, int]:
    if _INTERPRET:
        return min(_INTERPRET_MAX_BLOCK, max(16, triton.next_power_of_2(n))), 1
    return _GPU_BLOCK, _GPU_WARPS


def _t_and_n(x: Tensor) -> tuple[int, int]:
    if x.dim() < 1:
        raise ValueError("fullrange.kernels.lif: x must be time-major [T, ...], got a 0-d tensor")
    t = x.shape[0]
    n = x.numel() // t if t else 0
    if n >= 2**31:
        raise ValueError(f"fullrange.kernels.lif: N = numel / T = {n} must be < 2**31")
    return t, n


# ---------------------------------------------------------------- custom ops (forward, backward)


@torch.library.custom_op("fullrange::lif_fwd", mutates_args=())
def _lif_fwd(
    x: Tensor,
    decay: float,
    threshold: float,
    soft_reset: bool,
    surrogate_alpha: float,
    detach_reset: bool,
    save_state: bool,
) -> tuple[Tensor, Tensor]:
    """Forward: returns (spikes, h - threshold), both shaped and typed like x.

    surrogate_alpha and detach_reset are unused here; they are inputs so that the registered
    backward can read them. With save_state False the second output is an empty tensor.
    """
    _check_runnable(x)
    x = x.contiguous()
    t, n = _t_and_n(x)
    spikes = torch.empty_like(x)
    state = torch.empty_like(x) if save_state else x.new_empty((0,))
    if t == 0 or n == 0:
        return spikes, state
    block, warps = _launch_config(n)
    _lif_fwd_kernel[(triton.cdiv(n, block),)](
        x, spikes, state if save_state else spikes,  # d pointer unused when not storing
        t, n, float(decay), float(threshold),
        SOFT_RESET=soft_reset, STORE_D=save_state, BLOCK=block, num_warps=warps,
        **_NO_FMA,
    )
    return spikes, state


@_lif_fwd.register_fake
def _lif_fwd_fake(x, decay, threshold, soft_reset, surrogate_alpha, detach_reset, save_state):
    state = torch.empty_like(x, memory_format=torch.contiguous_format) if save_state else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), state


@torch.library.custom_op("fullrange::lif_bwd", mutates_args=())
def _lif_bwd(
    grad_spikes: Tensor,
    state: Tensor,
    decay: float,
    threshold: float,
    soft_reset: bool,
    surrogate_alpha: float,
    detach_reset: bool,
) -> Tensor:
    """Backward: gradient w.r.t. x (dtype and shape of state) from dL/ds and saved h - threshold."""
    _check_runnable(state)
    grad_spikes = grad_spikes.contiguous()
    state = state.contiguous()
    t, n = _t_and_n(state)
    grad_x = torch.empty_like(state)
    if t == 0 or n == 0:
        return grad_x
    block, warps = _launch_config(n)
    _lif_bwd_kernel[(triton.cdiv(n, block),)](
        grad_spikes, state, grad_x,
        t, n, (t - 1) * n, float(decay), float(threshold), float(surrogate_alpha),
        SOFT_RESET=soft_reset, DETACH_RESET=detach_reset, BLOCK=block, num_warps=warps,
    )
    return grad_x


@_lif_bwd.register_fake
def _lif_bwd_fake(grad_spikes, state, decay, threshold, soft_reset, surrogate_alpha, detach_reset):
    return torch.empty_like(state, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, decay, threshold, soft_reset, surrogate_alpha, detach_reset, save_state = inputs
    ctx.params = (decay, threshold, soft_reset, surrogate_alpha, detach_reset)
    ctx.save_state = save_state
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_spikes, grad_state):
    if not ctx.save_state:
        raise RuntimeError(
            "fullrange.kernels.lif: backward through a forward run with save_state=False "
            "(call lif_multistep_triton with grad enabled on an input that requires grad)."
        )
    (state,) = ctx.saved_tensors
    if grad_spikes is None:
        grad_spikes = torch.zeros_like(state)
    grad_x = _lif_bwd(grad_spikes.to(state.dtype), state, *ctx.params)
    return grad_x, None, None, None, None, None, None


_lif_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public entry point


def lif_multistep_triton(x: Tensor, decay: float, threshold: float, reset: str, surrogate_alpha: float,
                         detach_reset: bool) -> Tensor:
    """Multi-step LIF on a time-major x [T, ...] (fp32, bf16 or fp16); returns spikes like x.

    decay is lam in h_t = lam * v_{t-1} + x_t, threshold is theta, reset is "hard" or "soft",
    surrogate_alpha is the sigmoid surrogate's slope, detach_reset cuts the gradient through
    the reset. Differentiable w.r.t. x; saves h - theta (x's dtype) for the backward only when
    grad is enabled and x requires grad.
    """
    if reset not in ("hard", "soft"):
        raise ValueError(f"fullrange.kernels.lif: reset must be 'hard' or 'soft', got {reset!r}")
    save_state = torch.is_grad_enabled() and x.requires_grad
    spikes, _ = _lif_fwd(
        x, float(decay), float(threshold), reset == "soft", float(surrogate_alpha),
        bool(detach_reset), save_state,
    )
    return spikes
