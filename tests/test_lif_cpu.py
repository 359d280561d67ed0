"""fullrange.kernels.lif_cpu (the fused numba CPU LIF kernel) against an independent reference.

Spikes and the recomputed h - theta must equal a plain PyTorch loop bit for bit (no FMA in the
charge), input gradients must match to 1e-5 in fp32; the threaded path (torch's OpenMP team)
must agree bit for bit with the single-threaded one; the op must pass torch.library.opcheck
and trace under torch.compile(fullgraph=True). Subprocesses check the environments a user can
be in: numba missing, OMP_NUM_THREADS=1 (one thread, no numba thread pool), no writable cache
directory, and a second process that loads the compiled kernels from the cache.
(Backend selection and a float64 gradcheck of the "cpu" backend are in test_neuron.py.)
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fullrange.kernels import lif_cpu
from fullrange.kernels.lif_cpu import _lif_cpu_bwd, _lif_cpu_fwd, lif_multistep_cpu
from fullrange.neuron import lif_reference

pytestmark = pytest.mark.skipif(not lif_cpu.cpu_kernel_available(),
                                reason=f"numba is not importable: {lif_cpu.cpu_kernel_error()}")
REPO = Path(__file__).resolve().parents[1]
PAPER = {"hard": (0.5, 1.0, 4.0), "soft": (0.2, 1.0, 4.0)}  # reset -> (decay, theta, alpha)
CASES = [(reset, detach, t, n) for reset, detach, t, n in
         itertools.product(["hard", "soft"], [False, True], [1, 2, 4, 6], [1, 4097])]


def make_inputs(t, inner, theta=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, *inner, generator=g) * 0.8 + 0.6
    x.view(t, -1)[0, ::7] = theta  # h == theta exactly at t = 0: must spike (h >= theta)
    grad_s = torch.randn(t, *inner, generator=g)
    return x.to(dtype), grad_s.to(dtype)


def check_against_reference(t, inner, reset, detach, decay, theta, alpha, seed, dtype=torch.float32):
    x, grad_s = make_inputs(t, inner, theta, seed, dtype)
    xr = x.clone().requires_grad_()
    ref_s, ref_h, _ = lif_reference(xr, decay, theta, reset, alpha, detach)
    ref_s.backward(grad_s)
    xk = x.clone().requires_grad_()
    s = lif_multistep_cpu(xk, decay, theta, reset, alpha, detach)
    s.backward(grad_s)
    d = torch.empty_like(x)
    lif_cpu._membrane(*(a.view(t, -1).numpy() for a in (x, d)), *lif_cpu._scalars(dtype, decay, theta),
                      reset == "soft")
    assert s.shape == x.shape and s.dtype == x.dtype and xk.grad.dtype == x.dtype
    assert torch.equal(s, ref_s.detach())
    assert torch.equal(d, ref_h.detach() - theta)  # same roundings as the reference: exact
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(xk.grad, xr.grad, rtol=0, atol=tol)
    return ref_s


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("reset, detach, T, N", CASES, ids=[f"{r}-detach{int(d)}-T{t}-N{n}" for r, d, t, n in CASES])
def test_matches_reference(reset, detach, T, N):
    ref_s = check_against_reference(T, [N], reset, detach, *PAPER[reset], seed=T * 10 + N)
    if N > 1:
        assert 0.05 < ref_s.mean() < 0.95  # both branches exercised


@pytest.mark.parametrize("reset, detach, T, inner, decay, theta, alpha", [
    ("hard", False, 3, [2, 3, 5, 7], 0.9, 0.7, 2.5),  # a [T, B, C, H, W]-like shape
    ("soft", False, 5, [2, 3, 5, 7], 0.75, 1.3, 6.0),
    ("soft", True, 4, [300], 0.3, 0.5, 1.0),
    ("hard", False, 9, [257], 1.0, 1.0, 4.0),  # decay 1: no leak
    ("hard", True, 4, [257], 0.0, 1.0, 4.0),  # decay 0: no memory
])
def test_other_parameters(reset, detach, T, inner, decay, theta, alpha):
    check_against_reference(T, inner, reset, detach, decay, theta, alpha, seed=5)


@pytest.mark.parametrize("T", [3, 5, 9])
@pytest.mark.parametrize("reset, detach", [("hard", False), ("soft", False), ("hard", True)])
def test_multi_block_T(T, reset, detach):
    """T other than 1, 2, 4: blocks of 4 and 1 steps, state carried through scratch buffers."""
    check_against_reference(T, [4099], reset, detach, *PAPER[reset], seed=T)


def test_eager_path_equals_custom_op():
    """Eager mode runs a plain autograd Function; torch.compile the custom op: same numbers."""
    x, grad_s = make_inputs(4, [3, 33], seed=21)
    xe, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    se = lif_multistep_cpu(xe, 0.2, 1.0, "soft", 4.0, False)
    so = _lif_cpu_fwd(xo, 0.2, 1.0, True, 4.0, False)
    assert se.grad_fn.name() != so.grad_fn.name()  # really two paths
    se.backward(grad_s)
    so.backward(grad_s)
    assert torch.equal(se, so) and torch.equal(xe.grad, xo.grad)


@pytest.mark.parametrize("reset, detach", [("hard", False), ("soft", True)])
def test_float64(reset, detach):
    check_against_reference(4, [1000], reset, detach, *PAPER[reset], seed=3, dtype=torch.float64)


def _run_threads(threads, x, grad_s, reset, detach):
    torch.set_num_threads(threads)
    xk = x.clone().requires_grad_()
    s = lif_multistep_cpu(xk, *PAPER[reset][:2], reset, 4.0, detach)
    s.backward(grad_s)
    return s, xk.grad


@pytest.mark.parametrize("T", [1, 3, 4, 6])
@pytest.mark.parametrize("n", [4097, 3 * lif_cpu.CLAIM_MAX + 1001])
def test_threads_equal_one_thread(T, n):
    """torch's OpenMP team, columns claimed in ranges: bitwise what one thread computes."""
    if lif_cpu._gomp_parallel() is None:
        pytest.skip("torch has no OpenMP runtime loaded here: the kernels run single-threaded")
    x, grad_s = make_inputs(T, [n], seed=T * n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = T * n >= lif_cpu.PARALLEL_MIN_ELEMENTS and n > lif_cpu.CLAIM_MIN
        assert lif_cpu._plan(T, n)[0] == (2 if threaded else 1)
        for reset, detach in itertools.product(["hard", "soft"], [False, True]):
            one = _run_threads(1, x, grad_s, reset, detach)
            two = _run_threads(2, x, grad_s, reset, detach)
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    finally:
        torch.set_num_threads(before)


def test_without_openmp_runtime_runs_single_threaded(monkeypatch):
    monkeypatch.setattr(lif_cpu, "_OPENMP", [None])
    assert lif_cpu._plan(4, 1 << 20) == (1, 1 << 20)
    check_against_reference(4, [3 * lif_cpu.CLAIM_MAX], "soft", True, *PAPER["soft"], seed=2)


def test_sigmoid_slope_accuracy():
    """p(1 - p) of the float32 exp-based formula against float64, over the whole range."""
    f32 = np.float32
    x = (np.linspace(-25, 25, 480001).astype(f32) + f32(1.0)).reshape(1, -1)
    gx = np.empty_like(x)
    # T = 1, soft, detached: g_x = g_s * a * p(1 - p) at d = x - threshold, a = 4
    lif_cpu._backward_columns(x, np.ones_like(x), gx, 0, x.shape[1], np.empty((1, 16), f32), np.empty((1, 16), f32),
                              np.empty(16, f32), f32(0.5), f32(1.0), f32(4.0), True, f32(0.0),
                              f32(0.0), f32(1.0))
    z = 4.0 * (x[0] - f32(1.0)).astype(np.float64)
    e = np.exp(-np.abs(z))
    exact = 4.0 * e / (1.0 + e) ** 2
    rel = np.abs(gx[0] - exact) / exact
    assert rel[np.abs(z) < 16].max() < 1.5e-6  # measured 1.1e-6
    assert rel[np.abs(z) < 80].max() < 5e-6  # measured 3.9e-6 (rounding of z log2(e))
    assert np.abs(gx[0] - exact).max() < 3e-7  # measured 1.7e-7; torch's fp32 sigmoid: ~1e-7


CONSTANT_CASES = [(t, n, threads) for t in (1, 2, 3, 4, 6)
                  for n, threads in ((37, 1), (3 * lif_cpu.CLAIM_MAX + 1001, 2))]


@pytest.mark.parametrize("T, N, threads", CONSTANT_CASES, ids=[f"T{t}-N{n}-threads{k}" for t, n, k in CONSTANT_CASES])
def test_constant_input_equals_the_repeated_input(T, N, threads):
    """An input that is the same at every step (a stem run once): the kernel reads x[N] T times
    without the repeat. Spikes equal the reference on the repeated input bit for bit; the
    gradient is the reference's T input gradients summed (1e-5 fp32, 1e-12 fp64), for both
    resets, detached or not, T through the fused (1, 2, 4) and the blocked (3, 6) steps, one
    thread and torch's team (the buffered pass covers every T for a constant input)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (reset, detach), dtype in itertools.product([("hard", False), ("soft", False), ("hard", True),
                                                         ("soft", True)], [torch.float32, torch.float64]):
            decay, theta, alpha = PAPER[reset]
            x, grad_s = make_inputs(T, [N], theta, seed=T * 7 + N, dtype=dtype)
            x = x[0]
            xr = x.expand(T, N).clone().requires_grad_()
            ref_s = lif_reference(xr, decay, theta, reset, alpha, detach)[0]
            ref_s.backward(grad_s)
            s = lif_cpu.lif_constant_input_cpu(x, T, decay, theta, reset)
            g = lif_cpu.lif_constant_input_grad_cpu(grad_s, x, decay, theta, reset, alpha, detach)
            assert s.shape == (T, N) and g.shape == (N,) and g.dtype == dtype
            assert torch.equal(s, ref_s.detach()), (reset, detach, dtype)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(g, xr.grad.sum(0), rtol=0, atol=tol * T, msg=f"{reset} {detach} {dtype}")
            if N > 1000:
                assert 0.05 < ref_s.mean() < 0.95
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- op behaviour


def test_saves_only_x_and_layouts():
    x, grad_s = make_inputs(4, [3, 33], seed=7)
    ref_s = lif_reference(x, 0.5, 1.0, "hard", 4.0, False)[0]
    with torch.no_grad():
        assert torch.equal(lif_multistep_cpu(x.clone().requires_grad_(), 0.5, 1.0, "hard", 4.0, False), ref_s)
    saved = []
    xs = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lif_multistep_cpu(xs, 0.5, 1.0, "hard", 4.0, False)
    assert len(saved) == 1 and saved[0].data_ptr() == xs.data_ptr()  # x itself, nothing new
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    assert torch.equal(lif_multistep_cpu(xt, 0.5, 1.0, "hard", 4.0, False), ref_s)
    for empty in (x[:0], x[:, :0]):  # T = 0 and N = 0
        e = empty.clone().requires_grad_()
        out = lif_multistep_cpu(e, 0.5, 1.0, "hard", 4.0, False)
        out.sum().backward()
        assert out.shape == e.shape and e.grad.shape == e.shape
    xr = x.clone().requires_grad_()
    lif_multistep_cpu(xr, 0.5, 1.0, "soft", 4.0, False).sum().backward()  # stride-0 gradient
    xe = x.clone().requires_grad_()
    lif_reference(xe, 0.5, 1.0, "soft", 4.0, False)[0].sum().backward()
    torch.testing.assert_close(xr.grad, xe.grad, rtol=0, atol=1e-5)


def test_errors():
    with pytest.raises(TypeError, match="float32 or float64"):
        lif_multistep_cpu(torch.zeros(2, 3, dtype=torch.bfloat16), 0.5, 1.0, "hard", 4.0, False)
    with pytest.raises(ValueError, match="reset"):
        lif_multistep_cpu(torch.zeros(2, 3), 0.5, 1.0, "bogus", 4.0, False)


@pytest.mark.parametrize("label", ["fwd", "fwd_soft_nograd", "bwd"])
def test_opcheck(label):
    x, grad_s = make_inputs(2, [3, 5], seed=9)
    small = x.clone().requires_grad_()
    op, args = {
        "fwd": (_lif_cpu_fwd, (small, 0.5, 1.0, False, 4.0, False)),
        "fwd_soft_nograd": (_lif_cpu_fwd, (x, 0.2, 1.0, True, 4.0, True)),
        "bwd": (_lif_cpu_bwd, (grad_s, x, 0.5, 1.0, False, 4.0, False)),
    }[label]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    from fullrange.neuron import LIF

    x, grad_s = make_inputs(4, [3, 33], seed=13)

    def loss(inp):
        return (lif_multistep_cpu(inp, 0.5, 1.0, "hard", 4.0, False) * grad_s).sum()

    module = LIF(0.2, 1.0, "soft")  # backend "auto" -> the CPU kernel
    for fn in (loss, lambda inp: (module(inp) * grad_s).sum()):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        fn(xe).backward()
        torch.compile(fn, backend="aot_eager", fullgraph=True)(xc).backward()
        assert torch.equal(xc.grad, xe.grad)


def test_threads_follow_torch(monkeypatch):
    big = lif_cpu.PARALLEL_MIN_ELEMENTS * 16
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert lif_cpu._plan(4, big // 4)[0] == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert lif_cpu._plan(4, 100)[0] == 1  # small tensors never wake threads
    if lif_cpu._gomp_parallel() is not None:
        threads, claim = lif_cpu._plan(4, big // 4)
        assert threads == 8 and claim % 16 == 0
        assert lif_cpu.CLAIM_MIN <= claim <= lif_cpu.CLAIM_MAX


# ---------------------------------------------------------------- environments (subprocesses)


def _python(code, env_update=None, timeout=300):
    env = dict(os.environ, **(env_update or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_import_without_numba():
    code = (
        "import sys, warnings; sys.modules['numba'] = None\n"
        "import torch\n"
        "from fullrange.kernels import lif_cpu\n"
        "from fullrange.neuron import lif, lif_multistep, resolve_backend\n"
        "assert not lif_cpu.cpu_kernel_available() and 'numba' in lif_cpu.cpu_kernel_error()\n"
        "try:\n"
        "    lif_cpu.lif_multistep_cpu(torch.zeros(2, 3), 0.5, 1.0, 'hard', 4.0, False)\n"
        "except RuntimeError as e:\n"
        "    assert 'numba is not importable' in str(e), e\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(3, 50)\n"
        "    assert resolve_backend('auto', x) == 'torch' and torch.equal(lif(x), lif_multistep(x))\n"
        "assert any('falls back to the torch loop' in str(m.message) for m in w)\n"
        "print('OK')\n"
    )
    proc = _python(code)
    assert proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_single_thread_process_uses_cache_and_no_thread_pool():
    """A new process with OMP_NUM_THREADS=1 (multi-process runs): one core, no numba worker
    threads started, and the kernels are loaded from numba's cache, not compiled again."""
    cached = type(lif_cpu._forward_columns._cache).__name__ != "NullCache"
    check_against_reference(2, [10], "hard", False, *PAPER["hard"], seed=1)  # compiled and saved
    code = (
        "import torch\n"
        "from fullrange.kernels import lif_cpu\n"
        "from fullrange.neuron import lif\n"
        "from numba.np.ufunc import parallel\n"
        "x = torch.randn(4, 1 << 18, requires_grad=True)\n"
        "lif(x).sum().backward()\n"
        "st = [f.stats for f in (lif_cpu._forward_columns, lif_cpu._backward_columns)]\n"
        "print(torch.get_num_threads(), parallel._is_initialized,\n"
        "      sum(sum(s.cache_hits.values()) for s in st), sum(sum(s.cache_misses.values()) for s in st))\n"
    )
    proc = _python(code, {"OMP_NUM_THREADS": "1"})
    out = proc.stdout.split()
    assert out[:2] == ["1", "False"], proc.stdout + proc.stderr[-3000:]
    if cached:
        assert out[2:] == ["2", "0"], proc.stdout + proc.stderr[-3000:]


def test_no_writable_cache_dir_still_works(tmp_path):
    """Read-only install and home: no cache locator -> compile per process, no error."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy(REPO / "kernels" / "lif_cpu.py", pkg / "lif_cpu_copy.py")
    (pkg / "__pycache__").write_text("a file where numba wants its cache directory")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1])\n"
        "import lif_cpu_copy as k\n"
        "assert type(k._forward_columns._cache).__name__ == 'NullCache', k._forward_columns._cache\n"
        "x = torch.tensor([[0.5, 1.0, 2.0], [0.8, 0.1, 0.0]])\n"
        "with torch.no_grad():\n"
        "    print(k.lif_multistep_cpu(x, 0.5, 1.0, 'hard', 4.0, False).tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(blocker), XDG_CACHE_HOME=str(blocker / "cache"))
    proc = subprocess.run([sys.executable, "-c", code, str(pkg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]", proc.stderr[-3000:]
