"""Multi-step leaky integrate-and-fire (LIF) neuron.

All tensors are time-major: ``x[T, ...]`` -> ``spikes[T, ...]``. Semantics (PAPER.md and the
official code):

    h_t = decay * v_{t-1} + x_t                 (v_0 = 0, no input decay)
    s_t = H(h_t - threshold)                    (spike when h_t >= threshold)
    hard reset: v_t = h_t * (1 - s_t)           soft reset: v_t = h_t - threshold * s_t
    surrogate:  ds/dh = a * sig(a (h - threshold)) * (1 - sig(a (h - threshold)))

The reset is part of the graph unless ``detach_reset=True``. The backward runs in reverse time
(g_s: gradient arriving at the spikes, sg: surrogate at h_t, lam: decay):

    hard: g_h_t = g_s_t * sg + lam * g_h_{t+1} * (1 - s_t - h_t * sg)      detached: (1 - s_t)
    soft: g_h_t = g_s_t * sg + lam * g_h_{t+1} * (1 - threshold * sg)      detached: 1
    g_x_t = g_h_t

Backends: ``"torch"`` is the autograd Function below (a loop over T of fused in-place ATen ops;
only ``h - threshold`` is saved, in x's dtype); ``"triton"`` is
``fullrange.kernels.lif.lif_multistep_triton`` (CUDA); ``"cpu"`` is
``fullrange.kernels.lif_cpu.lif_multistep_cpu`` (fused numba kernels for float32/float64 CPU
tensors on torch's own threads; autograd keeps only x, from which the backward recomputes
h - threshold; spikes bit-identical to the torch backend); ``"auto"`` takes Triton
for CUDA fp32/fp16/bf16 tensors and the CPU kernel for CPU fp32/fp64 tensors when they import,
else torch (so bf16/fp16 on CPU, e.g. under CPU autocast, stay on torch). Half/bf16 inputs are
integrated in fp32 and spikes are returned in the input dtype.

Numerics of the torch backend: the charge is evaluated as ``decay * v`` then ``+ x`` (two
roundings, no fused multiply-add), so its spikes are bit-identical to a plain PyTorch loop of
the formulas (lif_reference). Without autograd (no_grad, or x not requiring grad) nothing is
saved. For half inputs the saved h - threshold is rounded to fp16, so a spike recomputed in the
backward can disagree with the forward only when |h - threshold| is below fp16's resolution.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

RESETS = ("hard", "soft")
BACKENDS = ("auto", "torch", "triton", "cpu")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)

__all__ = ["LIF", "lif", "lif_input_grad", "lif_constant_input", "lif_constant_input_grad",
           "lif_multistep", "lif_reference", "lif_membrane", "resolve_backend",
           "check_lif_args", "RESETS", "BACKENDS"]


def check_lif_args(decay: float, threshold: float, reset: str, surrogate_alpha: float,
                   detach_reset: bool, backend: str = "auto") -> None:
    """Raise ValueError (one line: which argument, what value, what was expected) on bad args."""
    def _finite_number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"LIF {name} must be a real number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"LIF {name} must be finite, got {value!r}")

    _finite_number("decay", decay)
    _finite_number("threshold", threshold)
    _finite_number("surrogate_alpha", surrogate_alpha)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"LIF decay must be in [0, 1], got {decay!r}")
    if threshold <= 0.0:
        raise ValueError(f"LIF threshold must be > 0, got {threshold!r}")
    if surrogate_alpha <= 0.0:
        raise ValueError(f"LIF surrogate_alpha must be > 0, got {surrogate_alpha!r}")
    if reset not in RESETS:
        raise ValueError(f"LIF reset must be one of {RESETS}, got {reset!r}")
    if not isinstance(detach_reset, bool):
        raise ValueError(f"LIF detach_reset must be a bool, got {detach_reset!r}")
    if backend not in BACKENDS:
        raise ValueError(f"LIF backend must be one of {BACKENDS}, got {backend!r}")


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"LIF input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("LIF input must be time-major [T, ...] with at least one dimension, "
                         "got a 0-d tensor")
    if not x.is_floating_point():
        raise ValueError(f"LIF input must be floating point, got {x.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _lif_forward(x: torch.Tensor, decay: float, threshold: float, hard: bool,
                 save_h: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward loop over T: (spikes, h - threshold or None). x must be contiguous."""
    T = x.shape[0]
    spikes = torch.empty_like(x, memory_format=torch.contiguous_format)
    h_minus_th = torch.empty_like(spikes) if save_h else None
    if T == 0:
        return spikes, h_minus_th
    low_precision = x.dtype in _LOW_PRECISION
    # State buffer: v_{t-1}, then h_t after charging, then v_t after the reset.
    h = torch.empty(x.shape[1:], dtype=_compute_dtype(x.dtype), device=x.device)
    for t in range(T):
        if t == 0:
            cur = h.copy_(x[0]) if low_precision else x[0]  # v_0 = 0 -> h_1 = x_1
        else:
            # decay * v + x with the two roundings of the formula (no fused multiply-add), so
            # the spikes are bit-identical to a plain `decay * v + x` loop.
            cur = h.mul_(decay).add_(x[t])
        if h_minus_th is not None:
            torch.sub(cur, threshold, out=h_minus_th[t])
        torch.ge(cur, threshold, out=spikes[t])
        if t + 1 < T:  # the final reset is never observed
            if hard:
                torch.addcmul(cur, cur, spikes[t], value=-1.0, out=h)  # h * (1 - s)
            else:
                torch.add(cur, spikes[t], alpha=-threshold, out=h)  # h - theta * s
    return spikes, h_minus_th


class _LIFMultiStep(torch.autograd.Function):
    """Torch backend: a forward loop over T saving only h - threshold; a reverse-time backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, decay: float, threshold: float, hard: bool,
                alpha: float, detach_reset: bool) -> torch.Tensor:
        spikes, h_minus_th = _lif_forward(x.contiguous(), decay, threshold, hard, save_h=True)
        ctx.save_for_backward(h_minus_th)
        ctx.lif = (decay, threshold, hard, alpha, detach_reset)
        return spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes: torch.Tensor):
        (h_minus_th,) = ctx.saved_tensors
        decay, threshold, hard, alpha, detach_reset = ctx.lif
        grad_x = _lif_backward(grad_spikes.contiguous(), h_minus_th, decay, threshold, hard,
                               alpha, detach_reset)
        return grad_x, None, None, None, None, None


def _lif_backward(grad_s: torch.Tensor, h_minus_th: torch.Tensor, decay: float, threshold: float,
                  hard: bool, alpha: float, detach_reset: bool) -> torch.Tensor:
    """Reverse-time LIF backward from the saved h - threshold. Returns grad_x in h's dtype.

    With p = sigmoid(alpha * (h - theta)) the surrogate is sg = alpha * p * (1 - p). Writing
    G = g_h_{t+1} / alpha for the running state (zero after the last step), one step is
        hard:          G <- p(1-p) * (g_s - lam*alpha*h*G) + lam * (1 - s) * G
        hard detached: G <- p(1-p) * g_s                   + lam * (1 - s) * G
        soft:          G <- p(1-p) * (g_s - lam*alpha*theta*G) + lam * G
        soft detached: G <- p(1-p) * g_s                       + lam * G
    and grad_x[t] = alpha * G. Keeping G scaled by 1/alpha lets sigmoid_backward (q*p*(1-p))
    do the surrogate product in one fused op.
    """
    T = h_minus_th.shape[0]
    grad_x = torch.empty_like(h_minus_th)
    if T == 0:
        return grad_x
    cdt = _compute_dtype(h_minus_th.dtype)
    shape, dev = h_minus_th.shape[1:], h_minus_th.device
    p = torch.empty(shape, dtype=cdt, device=dev)
    q = torch.empty(shape, dtype=cdt, device=dev)
    acc = torch.empty(shape, dtype=cdt, device=dev)
    # half/bf16: widen the saved h - theta once per step so every product runs in fp32
    hm32 = torch.empty(shape, dtype=cdt, device=dev) if cdt != h_minus_th.dtype else None
    sig_bwd = torch.ops.aten.sigmoid_backward.grad_input
    lam, a = decay, alpha
    for t in range(T - 1, -1, -1):
        hm = h_minus_th[t] if hm32 is None else hm32.copy_(h_minus_th[t])
        gs = grad_s[t]
        torch.mul(hm, a, out=p)
        torch.sigmoid(p, out=p)
        if t == T - 1:
            sig_bwd(gs, p, grad_input=acc)
        elif detach_reset:
            sig_bwd(gs, p, grad_input=q)
            if hard:
                torch.lt(hm, 0.0, out=p)  # 1 - s
                torch.addcmul(q, p, acc, value=lam, out=acc)
            else:
                torch.add(q, acc, alpha=lam, out=acc)
        elif hard:
            torch.add(hm, threshold, out=q)  # h
            torch.addcmul(gs, acc, q, value=-lam * a, out=q)
            sig_bwd(q, p, grad_input=q)
            torch.lt(hm, 0.0, out=p)  # 1 - s
            torch.addcmul(q, p, acc, value=lam, out=acc)
        else:
            torch.add(gs, acc, alpha=-lam * a * threshold, out=q)
            sig_bwd(q, p, grad_input=q)
            torch.add(q, acc, alpha=lam, out=acc)
        torch.mul(acc, a, out=grad_x[t])
    return grad_x


def lif_multistep(x: torch.Tensor, decay: float = 0.5, threshold: float = 1.0,
                  reset: str = "hard", surrogate_alpha: float = 4.0,
                  detach_reset: bool = False) -> torch.Tensor:
    """LIF over time on the torch backend: x[T, ...] -> spikes[T, ...] (x's dtype).

    Differentiable through the sigmoid surrogate (see module docstring). Half/bf16 inputs are
    integrated in fp32; float64 stays float64. Only h - threshold is saved for backward.
    """
    check_lif_args(decay, threshold, reset, surrogate_alpha, detach_reset)
    _check_input(x)
    return _lif_torch(x, decay, threshold, reset, surrogate_alpha, detach_reset)


def _lif_torch(x, decay, threshold, reset, surrogate_alpha, detach_reset):
    if not (x.requires_grad and torch.is_grad_enabled()):  # inference: nothing to save
        return _lif_forward(x.contiguous(), float(decay), float(threshold), reset == "hard",
                            save_h=False)[0]
    return _LIFMultiStep.apply(x, float(decay), float(threshold), reset == "hard",
                               float(surrogate_alpha), detach_reset)


class SurrogateSpike(torch.autograd.Function):
    """d = h - threshold [...] -> spikes (d >= 0) in d's dtype; backward: the sigmoid surrogate
    a * sig(a d) * (1 - sig(a d))."""

    @staticmethod
    def forward(ctx, d, alpha):
        ctx.save_for_backward(d)
        ctx.alpha = alpha
        return (d >= 0).to(d.dtype)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * d)
        return grad * ctx.alpha * sig * (1 - sig), None


def lif_reference(x: torch.Tensor, decay: float = 0.5, threshold: float = 1.0, reset: str = "hard",
                  surrogate_alpha: float = 4.0, detach_reset: bool = False):
    """The LIF of the module docstring, stated once as a plain loop over T of autograd ops:
    x[T, ...] -> (spikes, h pre-fire, v post-reset), each [T, ...] in x's dtype.

    The reference that the fast paths (the torch backend below, the Triton and CPU kernels) are
    checked against, and the "textbook" loop that bench/lif.py times. Its gradients come from
    autograd through SurrogateSpike, so it also checks the hand-written backward recurrences."""
    v = torch.zeros_like(x[0])
    spikes, hs, vs = [], [], []
    for t in range(x.shape[0]):
        h = decay * v + x[t]
        s = SurrogateSpike.apply(h - threshold, surrogate_alpha)
        r = s.detach() if detach_reset else s
        v = h * (1 - r) if reset == "hard" else h - threshold * r
        spikes.append(s)
        hs.append(h)
        vs.append(v)
    return torch.stack(spikes), torch.stack(hs), torch.stack(vs)


@torch.no_grad()
def lif_membrane(x: torch.Tensor, decay: float = 0.5, threshold: float = 1.0,
                 reset: str = "hard", surrogate_alpha: float = 4.0,
                 detach_reset: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lif_reference without autograd, for analysis: x[T, ...] -> (spikes, h, v).

    h[t] is the membrane after charging and before firing, v[t] after the reset. spikes are in
    x's dtype; h and v in the compute dtype (fp32 for half/bf16, else x's dtype). Arguments are
    validated as for lif_multistep."""
    check_lif_args(decay, threshold, reset, surrogate_alpha, detach_reset)
    _check_input(x)
    if x.shape[0] == 0:
        empty = torch.empty_like(x, dtype=_compute_dtype(x.dtype))
        return x.clone(), empty, empty.clone()
    spikes, h, v = lif_reference(x.to(_compute_dtype(x.dtype)), decay, threshold, reset, surrogate_alpha,
                                 detach_reset)
    return spikes.to(x.dtype), h, v


_IMPORTED: dict = {}  # kernel name -> (function, None) or (None, why it failed)


def _import_triton() -> Tuple[Optional[Callable], Optional[str]]:
    """Lazily import the Triton kernel once: (function, None) or (None, why it failed)."""
    if "triton" not in _IMPORTED:
        try:
            from fullrange.kernels.lif import lif_multistep_triton
            _IMPORTED["triton"] = (lif_multistep_triton, None)
        except ImportError as err:  # no triton, or the kernel module is absent
            _IMPORTED["triton"] = (None, f"{type(err).__name__}: {err}")
    return _IMPORTED["triton"]


def _import_cpu_kernel() -> Tuple[Optional[Callable], Optional[str]]:
    """Lazily import the fused CPU kernel once: (function, None) or (None, why it failed).

    (A plain dict cache, not functools.lru_cache, which torch.compile warns about.)
    """
    if "cpu" not in _IMPORTED:
        try:
            from fullrange.kernels import lif_cpu
            why = lif_cpu.cpu_kernel_error()  # numba did not import
            _IMPORTED["cpu"] = (None, why) if why else (lif_cpu.lif_multistep_cpu, None)
        except ImportError as err:  # the kernel module is absent
            _IMPORTED["cpu"] = (None, f"{type(err).__name__}: {err}")
    return _IMPORTED["cpu"]


_TRITON_CHECKS: dict = {}  # str(device) -> None (the kernel agrees with the torch backend) or why not


@torch.compiler.disable
def _triton_self_check(fn: Callable, device: torch.device) -> Optional[str]:
    """Compile and run the Triton kernel on a small fp32 tensor of `device` (both resets) and
    compare it with the torch backend: spikes equal, input gradients to 1e-5. None when it
    agrees, else why not (a compile error, or the first disagreement)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3000, generator=g) * 0.8 + 0.6).to(device)
    grad = torch.randn(4, 3000, generator=g).to(device)
    try:
        with torch.enable_grad():
            for reset, decay in (("hard", 0.5), ("soft", 0.2)):
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                sa = fn(xa, decay, 1.0, reset, 4.0, False)
                sb = _lif_torch(xb, decay, 1.0, reset, 4.0, False)
                (sa * grad).sum().backward()
                (sb * grad).sum().backward()
                if not torch.equal(sa, sb):
                    return f"its spikes differ from the torch backend ({reset} reset)"
                if not torch.allclose(xa.grad, xb.grad, rtol=0, atol=1e-5):
                    return f"its gradients differ from the torch backend ({reset} reset)"
    except Exception as err:  # noqa: BLE001 - any compile or launch failure means: do not use it
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def _triton_unusable(device: torch.device) -> Optional[str]:
    """Why the Triton kernel cannot serve `device` (it does not import, or its first-use check
    on that device failed), or None. Checked once per device."""
    fn, why = _import_triton()
    if fn is None:
        return why
    key = str(device)
    if key not in _TRITON_CHECKS:
        _TRITON_CHECKS[key] = _triton_self_check(fn, device)
    return _TRITON_CHECKS[key]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that will run x: "torch", "triton" or "cpu".

    "auto" -> "triton" for CUDA fp32/fp16/bf16 tensors when fullrange.kernels.lif imports and
    passes its first-use check on that device (compiled and compared with the torch backend),
    "cpu" for CPU fp32/fp64 tensors when fullrange.kernels.lif_cpu (numba) imports, else
    "torch" (float64 on GPU, half/bf16 on CPU, other devices); a fallback from a kernel that
    is unavailable warns once. A forced "triton" or "cpu" raises RuntimeError when its kernel is
    unavailable; "cpu" also when x is not a float32/float64 CPU tensor.
    """
    if backend not in BACKENDS:
        raise ValueError(f"LIF backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cpu" and not (x.device.type == "cpu" and x.dtype in _CPU_KERNEL_DTYPES):
        raise RuntimeError(f"LIF backend='cpu' needs a float32 or float64 CPU tensor, got "
                           f"{x.dtype} on {x.device}; use backend='auto' or 'torch'")
    forced = backend != "auto"
    if not forced:
        if x.device.type == "cpu" and x.dtype in _CPU_KERNEL_DTYPES:
            backend = "cpu"
        elif x.is_cuda and x.dtype in _TRITON_DTYPES:
            backend = "triton"
        else:
            return "torch"
    if backend == "triton":
        why, what = _triton_unusable(x.device), "fullrange.kernels.lif (Triton)"
    else:
        why, what = _import_cpu_kernel()[1], "fullrange.kernels.lif_cpu (numba)"
    if why is None:
        return backend
    if forced:
        raise RuntimeError(f"LIF backend={backend!r} but {what} is unavailable ({why}); "
                           f"use backend='torch' or 'auto'")
    _warn_fallback(what, why)
    return "torch"


@functools.lru_cache(maxsize=None)
def _warn_fallback(kernel: str, why: str) -> None:
    warnings.warn(f"LIF backend='auto' falls back to the torch loop: {kernel} is unavailable "
                  f"({why})", RuntimeWarning, stacklevel=3)


def lif(x: torch.Tensor, decay: float = 0.5, threshold: float = 1.0, reset: str = "hard",
        surrogate_alpha: float = 4.0, detach_reset: bool = False,
        backend: str = "auto") -> torch.Tensor:
    """LIF over time on the chosen backend: x[T, ...] -> spikes[T, ...]."""
    check_lif_args(decay, threshold, reset, surrogate_alpha, detach_reset, backend)
    _check_input(x)
    chosen = resolve_backend(backend, x)
    if chosen != "torch":
        fn, _ = _import_triton() if chosen == "triton" else _import_cpu_kernel()
        return fn(x, float(decay), float(threshold), reset, float(surrogate_alpha),
                  detach_reset)
    return _lif_torch(x, decay, threshold, reset, surrogate_alpha, detach_reset)


def lif_input_grad(x: torch.Tensor, grad_spikes: torch.Tensor, decay: float, threshold: float, reset: str,
                   surrogate_alpha: float, detach_reset: bool, backend: str = "auto") -> torch.Tensor:
    """dL/dx of lif(x, ...) from its input x[T, ...] and dL/dspikes (x's shape), for callers that
    kept x instead of the LIF's graph: the CPU kernel's backward (it recomputes h from x), the
    torch backend's forward loop (h - threshold) and backward, or autograd through the Triton
    kernel. Exactly the gradient lif's own backward gives."""
    chosen = resolve_backend(backend, x)
    if chosen == "cpu":
        from fullrange.kernels.lif_cpu import lif_input_grad_cpu

        return lif_input_grad_cpu(grad_spikes, x, decay, threshold, reset, surrogate_alpha, detach_reset)
    if chosen == "torch":
        _, h_minus_th = _lif_forward(x.contiguous(), float(decay), float(threshold), reset == "hard", save_h=True)
        return _lif_backward(grad_spikes.contiguous(), h_minus_th, float(decay), float(threshold), reset == "hard",
                             float(surrogate_alpha), detach_reset)
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return torch.autograd.grad(lif(x, decay, threshold, reset, surrogate_alpha, detach_reset, backend), x,
                                   grad_spikes)[0]


def lif_constant_input(x: torch.Tensor, T: int, decay: float, threshold: float, reset: str, surrogate_alpha: float,
                       detach_reset: bool, backend: str = "auto") -> torch.Tensor:
    """Spikes [T, *x.shape] of lif on an input x[...] that is the same at every one of T steps
    (a stem that runs once per image): values only, no autograd (the gradient is
    lif_constant_input_grad). The CPU kernel reads x once per column and never builds the
    repeated input; other backends run lif on x expanded over T. Spikes equal lif's on the
    repeated x bit for bit."""
    if resolve_backend(backend, x) == "cpu":
        from fullrange.kernels.lif_cpu import lif_constant_input_cpu

        return lif_constant_input_cpu(x, T, decay, threshold, reset)
    with torch.no_grad():
        return lif(x.expand(T, *x.shape), decay, threshold, reset, surrogate_alpha, detach_reset, backend)


def lif_constant_input_grad(x: torch.Tensor, grad_spikes: torch.Tensor, decay: float, threshold: float, reset: str,
                            surrogate_alpha: float, detach_reset: bool, backend: str = "auto") -> torch.Tensor:
    """dL/dx[...] of lif_constant_input(x, T, ...) from x and dL/dspikes [T, *x.shape]: the
    input gradients of the T steps, summed. The CPU kernel sums them in its backward pass
    (cache-sized buffers, no [T, ...] temporary); other backends sum lif_input_grad's result."""
    if resolve_backend(backend, x) == "cpu":
        from fullrange.kernels.lif_cpu import lif_constant_input_grad_cpu

        return lif_constant_input_grad_cpu(grad_spikes, x, decay, threshold, reset, surrogate_alpha, detach_reset)
    return lif_input_grad(x.expand(grad_spikes.shape), grad_spikes, decay, threshold, reset, surrogate_alpha,
                          detach_reset, backend).sum(0)


class LIF(nn.Module):
    """Multi-step LIF neuron: forward(x[T, ...]) -> spikes[T, ...] in x's dtype.

    Stateless between calls (the membrane starts at 0 on every forward). Expects a time-major
    tensor; a non-contiguous input is made contiguous. See the module docstring for the math.
    """

    def __init__(self, decay: float = 0.5, threshold: float = 1.0, reset: str = "hard",
                 surrogate_alpha: float = 4.0, detach_reset: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        check_lif_args(decay, threshold, reset, surrogate_alpha, detach_reset, backend)
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.reset = reset
        self.surrogate_alpha = float(surrogate_alpha)
        self.detach_reset = detach_reset
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lif(x, self.decay, self.threshold, self.reset, self.surrogate_alpha,
                   self.detach_reset, self.backend)

    def input_grad(self, x: torch.Tensor, grad_spikes: torch.Tensor) -> torch.Tensor:
        """dL/dx of forward(x) from x[T, ...] and dL/dspikes, without the forward's graph (lif_input_grad)."""
        return lif_input_grad(x, grad_spikes, self.decay, self.threshold, self.reset, self.surrogate_alpha,
                              self.detach_reset, self.backend)

    def forward_constant(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """spikes[T, *x.shape] of forward(x repeated T times), values only (lif_constant_input)."""
        return lif_constant_input(x, T, self.decay, self.threshold, self.reset, self.surrogate_alpha,
                                  self.detach_reset, self.backend)

    def constant_input_grad(self, x: torch.Tensor, grad_spikes: torch.Tensor) -> torch.Tensor:
        """dL/dx[...] of forward_constant(x, T) from dL/dspikes[T, ...] (lif_constant_input_grad)."""
        return lif_constant_input_grad(x, grad_spikes, self.decay, self.threshold, self.reset, self.surrogate_alpha,
                                       self.detach_reset, self.backend)

    def extra_repr(self) -> str:
        return (f"decay={self.decay}, threshold={self.threshold}, reset={self.reset!r}, "
                f"surrogate_alpha={self.surrogate_alpha}, detach_reset={self.detach_reset}, "
                f"backend={self.backend!r}")
