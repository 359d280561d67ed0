"""LIF neuron: forward, membrane and surrogate gradients against an independent step-by-step
reference, a numerical (gradcheck) check of the backward formula, low precision, arguments.
The reference and gradcheck tests run on both CPU backends: "torch" and "cpu" (the fused numba
kernel, fullrange.kernels.lif_cpu; kernel-specific tests are in test_lif_cpu.py)."""
import itertools

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import fullrange.neuron as neuron_mod
from fullrange.kernels.lif_cpu import cpu_kernel_available
from fullrange.neuron import LIF, lif, lif_input_grad, lif_membrane, lif_multistep, resolve_backend
from fullrange.neuron import lif_reference

needs_numba = pytest.mark.skipif(not cpu_kernel_available(), reason="numba is not importable")
CPU_BACKENDS = ["torch", pytest.param("cpu", marks=needs_numba)]


# ----------------------------------------------------------------------------- reference
def make_input(T, shape=(3, 4, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, *shape, generator=g, dtype=torch.float64) * 1.2 + 0.6).to(dtype)


CASES = list(itertools.product(["hard", "soft"], [False, True], [1, 2, 5, 9]))


# ----------------------------------------------------------------------------- forward / grads
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reset, detach, T", CASES)
@pytest.mark.parametrize("decay, theta, alpha", [(0.5, 1.0, 4.0), (0.2, 0.7, 2.5)])
def test_matches_reference(reset, detach, T, decay, theta, alpha, backend):
    x = make_input(T, seed=T).requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    s_ref, h_ref, v_ref = lif_reference(x, decay, theta, reset, alpha, detach)
    (g_ref,) = torch.autograd.grad(s_ref, x, grad_out)

    s = lif(x, decay, theta, reset, alpha, detach, backend=backend)
    (g,) = torch.autograd.grad(s, x, grad_out)
    assert resolve_backend(backend, x) == backend
    assert s.dtype == x.dtype and s.shape == x.shape
    assert torch.equal(s, s_ref.detach())
    assert 0 < s.sum() < s.numel()  # the case exercises both branches
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)

    s_m, h_m, v_m = lif_membrane(x.detach(), decay, theta, reset, alpha, detach)
    assert torch.equal(s_m, s_ref.detach())
    assert torch.equal(h_m, h_ref.detach()) and torch.equal(v_m, v_ref.detach())

    m = LIF(decay, theta, reset, alpha, detach, backend=backend)
    assert torch.equal(m(x), s)
    with torch.no_grad():  # the inference path saves nothing but must fire identically
        assert torch.equal(m(x), s)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("torch", torch.float64),
                                            ("torch", torch.bfloat16),  # the CPU kernel: fp32/fp64 only
                                            pytest.param("cpu", torch.float32, marks=needs_numba),
                                            pytest.param("cpu", torch.float64, marks=needs_numba)])
@pytest.mark.parametrize("reset, detach", [("hard", False), ("hard", True), ("soft", False), ("soft", True)])
def test_input_grad_equals_autograd_through_the_forward(reset, detach, dtype, backend):
    """lif_input_grad (the backward from the kept input, no forward graph: spikes_1bit's neuron
    unit) gives exactly the gradient autograd gives through lif on the same backend."""
    x = make_input(5, shape=(7, 9), seed=3, dtype=dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(lif(xr, 0.4, 0.9, reset, 3.0, detach, backend=backend), xr, grad_out)
    got = lif_input_grad(x, grad_out, 0.4, 0.9, reset, 3.0, detach, backend=backend)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert expected.abs().sum() > 0


def test_merged_input_grad_keeps_the_channels_last_layout():
    from fullrange.models.layers import MergedLIF

    m = MergedLIF(decay=0.5, reset="hard")
    x = (torch.randn(3 * 2, 4, 5, 6, generator=torch.Generator().manual_seed(4)) + 0.8).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # contiguous: another layout
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(m(xr, 3), xr, g)
    got = m.input_grad(x, g, 3)
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                            pytest.param("cpu", torch.float32, marks=needs_numba),
                                            pytest.param("cpu", torch.float64, marks=needs_numba)])
@pytest.mark.parametrize("reset, detach", [("hard", False), ("soft", True)])
def test_constant_input_equals_lif_on_the_repeat(reset, detach, dtype, backend):
    """MergedLIF.forward_constant / constant_input_grad (a stem that runs once: y[B, ...] the
    same at every step) give lif's spikes on repeat_time(y, T) exactly, and the repeat's
    gradient (autograd sums the T steps) to rounding, in y's layout (channels_last kept)."""
    from fullrange.models.layers import MergedLIF, repeat_time

    T = 3
    m = MergedLIF(decay=0.4, threshold=0.9, reset=reset, surrogate_alpha=3.0, detach_reset=detach, backend=backend)
    g = torch.Generator().manual_seed(6)
    y = (torch.randn(4, 5, 6, 7, generator=g) * 1.2 + 0.6).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(T * 4, 5, 6, 7, generator=g).to(dtype)
    yr = y.clone().requires_grad_()
    expected = m(repeat_time(yr, T), T)
    expected.backward(grad)
    spikes, got = m.forward_constant(y, T), m.constant_input_grad(y, grad, T)
    assert torch.equal(spikes, expected.detach()) and spikes.is_contiguous(memory_format=torch.channels_last)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), yr.grad.float(), rtol=0, atol=tol)
    assert yr.grad.abs().sum() > 0


def test_module_is_stateless_and_accepts_noncontiguous():
    m = LIF()
    x = make_input(4, shape=(6, 5))
    first = m(x)
    assert torch.equal(m(x), first)  # no membrane carried between calls
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not xt.is_contiguous()
    assert torch.equal(m(xt), first)
    xr = x.clone().requires_grad_(True)
    m(xr).sum().backward()  # an expanded (stride-0) upstream gradient
    assert torch.isfinite(xr.grad).all()
    assert "decay=0.5" in repr(m) and "reset='hard'" in repr(m) and "backend='auto'" in repr(m)


def test_empty_time():
    x = torch.zeros(0, 3, requires_grad=True)
    s = lif_multistep(x)
    assert s.shape == (0, 3)
    s.sum().backward()
    assert x.grad.shape == (0, 3)


# ----------------------------------------------------------------------------- gradcheck
def linearised_lif(x, x0, decay, theta, reset, alpha, detach_reset):
    """Forward that equals the LIF at x0 and whose TRUE derivative at x0 is the surrogate one.

    The spike is H(h0 - theta) + sig(a(h - theta)) - sig(a(h0 - theta)), with h0 the membrane of
    the unperturbed run at x0 (frozen). Its value at x = x0 is the Heaviside spike; its exact
    derivative is the sigmoid surrogate. Numerical differentiation therefore gives the
    surrogate Jacobian with no autograd formula involved.
    """
    _, h0, _ = lif_membrane(x0, decay, theta, reset, alpha, detach_reset)
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        h = decay * v + x[t]
        fired = (h0[t] >= theta).to(x.dtype)
        s = fired + torch.sigmoid(alpha * (h - theta)) - torch.sigmoid(alpha * (h0[t] - theta))
        r = fired if detach_reset else s
        v = h * (1 - r) if reset == "hard" else h - theta * r
        out.append(s)
    return torch.stack(out)


class SurrogateProbe(torch.autograd.Function):
    """Numerical side: the linearised LIF around x0. Analytic: the backend's backward at x0."""

    @staticmethod
    def forward(ctx, x, x0, args, backend="torch"):
        ctx.x0, ctx.args, ctx.backend = x0, args, backend
        return linearised_lif(x, x0, *args)

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            x0 = ctx.x0.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(lif(x0, *ctx.args, backend=ctx.backend), x0, g)
        return gx, None, None, None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reset, detach", list(itertools.product(["hard", "soft"], [False, True])))
def test_gradcheck_surrogate_backward(reset, detach, backend):
    args = (0.3, 0.8, reset, 3.0, detach)  # decay, threshold, reset, alpha, detach_reset
    x0 = make_input(5, shape=(4,), seed=3, dtype=torch.float64) * 0.8 + 0.2
    assert resolve_backend(backend, x0) == backend
    s = lif(x0, *args, backend=backend)
    assert 0 < s.sum() < s.numel()
    # at least one neuron fires twice, so reset gradients flow through a spike
    assert (s.sum(0) >= 2).any()
    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: SurrogateProbe.apply(x, x0, args, backend), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_catches_a_wrong_formula(monkeypatch):
    """The probe is sensitive: a backward with the reset term dropped fails it."""
    real = neuron_mod._lif_backward

    def wrong(grad_s, hm, decay, threshold, hard, alpha, detach_reset):
        return real(grad_s, hm, decay, threshold, hard, alpha, True)  # always detached

    monkeypatch.setattr(neuron_mod, "_lif_backward", wrong)
    x0 = make_input(5, shape=(4,), seed=3, dtype=torch.float64) * 0.8 + 0.2
    args = (0.3, 0.8, "hard", 3.0, False)
    x = x0.clone().requires_grad_(True)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: SurrogateProbe.apply(x, x0, args), (x,),
                                 eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_low_precision_integrates_in_fp32(dtype, reset):
    x = make_input(6, shape=(64, 32), seed=5).to(dtype)
    x32 = x.float()
    s_ref, h_ref, _ = lif_reference(x32, 0.2, 1.0, reset, 4.0, False)
    xr = x.clone().requires_grad_(True)
    s = lif_multistep(xr, 0.2, 1.0, reset, 4.0, False)
    assert s.dtype == dtype
    # a bf16/fp16 state would drift; an fp32 state matches the fp32 reference away from ties
    clear = (h_ref - 1.0).abs() > 1e-5
    assert torch.equal(s.float()[clear], s_ref[clear])
    s_m, h_m, _ = lif_membrane(x, 0.2, 1.0, reset)
    assert h_m.dtype == torch.float32 and torch.equal(h_m, h_ref)
    # gradients: finite, in the input dtype, close to the fp32 ones
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (gx,) = torch.autograd.grad(s, xr, g.to(dtype))
    x32r = x32.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(lif_multistep(x32r, 0.2, 1.0, reset, 4.0, False), x32r, g)
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all()
    assert (gx.float() - g32).abs().max() < 0.02 * g32.abs().max()


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"reset": "medium"}, "reset"),
    ({"decay": 1.5}, "decay"),
    ({"decay": -0.1}, "decay"),
    ({"decay": float("nan")}, "decay"),
    ({"threshold": 0.0}, "threshold"),
    ({"surrogate_alpha": -1.0}, "surrogate_alpha"),
    ({"detach_reset": "yes"}, "detach_reset"),
    ({"backend": "cuda"}, "backend"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LIF(**kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=match):
            lif_multistep(torch.ones(2, 3), **kwargs)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="floating point"):
        LIF()(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="time-major"):
        LIF()(torch.tensor(1.0))


# ----------------------------------------------------------------------------- backends
def test_auto_backend_on_cpu():
    fused = "cpu" if cpu_kernel_available() else "torch"
    for dtype in (torch.float32, torch.float64):
        assert resolve_backend("auto", torch.zeros(2, dtype=dtype)) == fused
        assert resolve_backend("torch", torch.zeros(2, dtype=dtype)) == "torch"
    for dtype in (torch.bfloat16, torch.float16):  # e.g. CPU autocast: the torch loop
        assert resolve_backend("auto", torch.zeros(2, dtype=dtype)) == "torch"


def test_cpu_backend_dispatch(monkeypatch):
    calls = []

    def fake(x, decay, threshold, reset, alpha, detach_reset):
        calls.append((decay, threshold, reset, alpha, detach_reset))
        return torch.zeros_like(x)

    monkeypatch.setattr(neuron_mod, "_import_cpu_kernel", lambda: (fake, None))
    out = LIF(0.25, 0.75, "soft", 3.0, True, backend="cpu")(torch.ones(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    assert calls == [(0.25, 0.75, "soft", 3.0, True)]
    with pytest.raises(RuntimeError, match="float32 or float64 CPU tensor"):
        lif(torch.ones(2, 3, dtype=torch.bfloat16), backend="cpu")

    monkeypatch.setattr(neuron_mod, "_import_cpu_kernel",
                        lambda: (None, "ImportError: no numba (test_neuron)"))
    with pytest.raises(RuntimeError, match="no numba"):
        lif(torch.ones(2, 3), backend="cpu")
    with pytest.warns(RuntimeWarning, match="no numba"):  # auto falls back to torch, says why
        assert resolve_backend("auto", torch.zeros(2)) == "torch"
    x = make_input(3, seed=4)
    assert torch.equal(lif(x), lif_multistep(x))


def test_triton_backend_dispatch(monkeypatch):
    calls = []

    def fake(x, decay, threshold, reset, alpha, detach_reset):
        calls.append((decay, threshold, reset, alpha, detach_reset))
        return torch.zeros_like(x)

    monkeypatch.setattr(neuron_mod, "_import_triton", lambda: (fake, None))
    monkeypatch.setitem(neuron_mod._TRITON_CHECKS, "cpu", None)  # as if it passed its first-use check
    out = LIF(0.25, 0.75, "soft", 3.0, True, backend="triton")(torch.ones(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    assert calls == [(0.25, 0.75, "soft", 3.0, True)]
    assert resolve_backend("auto", torch.zeros(2)) != "triton"  # auto never picks it on CPU

    monkeypatch.setattr(neuron_mod, "_import_triton", lambda: (None, "ImportError: no triton"))
    with pytest.raises(RuntimeError, match="no triton"):
        lif(torch.ones(2, 3), backend="triton")
