"""The fused CPU neuron unit (fullrange.models.unit_cpu over fullrange.kernels.bn_lif_cpu) against
nn.BatchNorm2d (+ the residual, + the downsample's nn.BatchNorm2d) + MergedLIF run as modules.

Spikes and running statistics (mean, variance, num_batches_tracked; momentum and the cumulative
average) must be equal bit for bit; input, residual and parameter gradients equal to 1e-5 in
fp32 and 1e-12 in fp64 (relative to the largest). T = 4 takes the one-loop path, other T the
blocked one; one thread and torch's OpenMP team. In the students the unit must run in every
memory mode and give the unfused model's logits exactly. The first-use check must turn the op
off where ATen's BatchNorm rounds otherwise.
"""
from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fullrange.kernels import lif_cpu
from fullrange.models import build_model, unit_cpu
from fullrange.models.layers import MergedLIF
from fullrange.models.memory import set_fusion, set_memory

pytestmark = pytest.mark.skipif(not lif_cpu.cpu_kernel_available(),
                                reason=f"numba is not importable: {lif_cpu.cpu_kernel_error()}")
CL = torch.channels_last


def _unit_inputs(kind, T, B, C, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = (torch.randn(T * B, C, H, H, generator=g, dtype=dtype) * 1.7 + 0.4).contiguous(memory_format=CL)
    residual = None
    if kind == "spikes":
        residual = (torch.rand(c.shape, generator=g, dtype=dtype) < 0.3).to(dtype).contiguous(memory_format=CL)
    elif kind == "downsample":
        residual = (torch.randn(c.shape, generator=g, dtype=dtype) * 2 - 0.3).contiguous(memory_format=CL)
    grad = torch.randn(c.shape, generator=g, dtype=dtype)
    return c, residual, grad


def _bn(C, dtype, seed, momentum=0.1):
    bn = nn.BatchNorm2d(C, momentum=momentum).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.rand(C, generator=g, dtype=dtype) - 0.3)
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=dtype))
    return bn


def _run(fused, c, residual, grad, bn, bn_d, lif, T, pack=False):
    """(spikes, [grad of c, of the residual, of each BN parameter], BN buffers) of one step."""
    c = c.clone().requires_grad_()
    r = None if residual is None else residual.clone().requires_grad_()
    if fused:
        assert unit_cpu.serves(c, bn, lif, r, bn_d)
        params = [p for m in (bn, bn_d) if m is not None for p in (m.weight, m.bias)]
        s = unit_cpu.FusedUnitCPU.apply(c, r, bn, bn_d, lif, T, pack, *params)
    else:
        y = bn(c)
        s = lif(y if r is None else y + (r if bn_d is None else bn_d(r)), T)
    s.backward(grad)  # as it is: a pool's expanded gradient reaches the unit expanded
    mods = [m for m in (bn, bn_d) if m is not None]
    grads = [c.grad] + ([] if r is None else [r.grad]) + [p.grad for m in mods for p in (m.weight, m.bias)]
    return s, grads, [b.clone() for m in mods for b in m.buffers()]


UNITS = list(itertools.product(["none", "spikes", "downsample"], [("hard", False), ("soft", False), ("hard", True)],
                               [4, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,reset,T", [(k, r, t) for k, r, t in UNITS])
def test_fused_unit_equals_the_modules(kind, reset, T, dtype):
    reset, detach = reset
    c, residual, grad = _unit_inputs(kind, T, 6, 24, 5, dtype)
    lif = MergedLIF(decay=0.5 if reset == "hard" else 0.2, reset=reset, detach_reset=detach, backend="cpu")
    bn, bn_d = _bn(24, dtype, 1), (_bn(24, dtype, 2) if kind == "downsample" else None)
    results = [_run(fused, c, residual, grad, copy.deepcopy(bn), copy.deepcopy(bn_d), lif, T, pack=fused)
               for fused in (True, False)]
    (s_f, g_f, b_f), (s_m, g_m, b_m) = results
    assert torch.equal(s_f, s_m) and 0.05 < s_m.mean().item() < 0.95
    assert s_f.is_contiguous(memory_format=CL)
    for a, b in zip(b_f, b_m):
        assert torch.equal(a, b)  # running mean, running var, num_batches_tracked
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(g_f, g_m):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max().item() <= tol * b.abs().max().item(), (kind, reset, T)


@pytest.mark.parametrize("kind,T", [("none", 4), ("downsample", 4), ("spikes", 3), ("downsample", 6)])
def test_fused_unit_reads_a_pool_gradient_as_it_is(kind, T):
    """A gradient expanded over the pixels (a global average pool's backward) is read without
    being spread out in memory: the same gradients as the modules given it written out."""
    c, residual, _ = _unit_inputs(kind, T, 5, 16, 6, torch.float32)
    pooled = torch.randn(c.shape[0], 16, 1, 1, generator=torch.Generator().manual_seed(3))
    grad = pooled.expand(c.shape)
    lif, bn = MergedLIF(decay=0.5, backend="cpu"), _bn(16, torch.float32, 1)
    bn_d = _bn(16, torch.float32, 2) if kind == "downsample" else None
    fused = _run(True, c, residual, grad, copy.deepcopy(bn), copy.deepcopy(bn_d), lif, T)
    plain = _run(False, c, residual, grad.contiguous(), copy.deepcopy(bn), copy.deepcopy(bn_d), lif, T)
    assert torch.equal(fused[0], plain[0])
    for a, b in zip(fused[1], plain[1]):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_unit_threads_and_cumulative_average(threads):
    """Large enough for torch's OpenMP team; BatchNorm with momentum=None over two steps."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        T = 4
        lif = MergedLIF(decay=0.5, backend="cpu")
        bn, bn_d = _bn(32, torch.float32, 3, momentum=None), _bn(32, torch.float32, 4, momentum=None)
        fused, plain = (copy.deepcopy(bn), copy.deepcopy(bn_d)), (copy.deepcopy(bn), copy.deepcopy(bn_d))
        for step in range(2):
            c, residual, grad = _unit_inputs("downsample", T, 16, 32, 9, torch.float32, seed=step)
            s_f, g_f, b_f = _run(True, c, residual, grad, *fused, lif, T)
            s_m, g_m, b_m = _run(False, c, residual, grad, *plain, lif, T)
            assert torch.equal(s_f, s_m)
            assert all(torch.equal(a, b) for a, b in zip(b_f, b_m))
            for a, b in zip(g_f, g_m):
                assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
            for m in fused + plain:
                m.weight.grad = m.bias.grad = None
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("mode", ["default", "spikes_1bit", "checkpoint"])
def test_student_step_fused_equals_unfused(mode, monkeypatch):
    """The demo student in channels_last: logits equal, gradients to 1e-5, and the fused op ran."""
    torch.manual_seed(0)
    model = build_model("spiking_resnet_tiny", 10, 1).to(memory_format=CL)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=CL)
    calls = []
    apply = unit_cpu.FusedUnitCPU.apply
    monkeypatch.setattr(unit_cpu.FusedUnitCPU, "apply", lambda *a: calls.append(1) or apply(*a))
    outs = []
    for fuse in (True, False):
        m = set_fusion(set_memory(copy.deepcopy(model), mode), fuse)
        logits = m(x, 4)
        logits.square().mean().backward()
        outs.append((logits.detach(), [p.grad for p in m.parameters()]))
    assert len(calls) == 6  # three blocks, two units each (the stem is its constant-input unit)
    (l_f, g_f), (l_m, g_m) = outs
    assert torch.equal(l_f, l_m)
    for a, b in zip(g_f, g_m):
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 16, 14, 14), (32, 64, 7, 7), (16, 24, 5, 7)])
def test_bn_output_is_atens_bit_for_bit(shape, dtype):
    """The kernel's BatchNorm output (the expression its forward and backward use) against
    aten.native_batch_norm: two roundings instead of one differ in about a third of the values."""
    from fullrange.kernels import bn_lif_cpu

    g = torch.Generator().manual_seed(1)
    c = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 0.5).contiguous(memory_format=CL)
    w, b = torch.randn(shape[1], generator=g, dtype=dtype), torch.randn(shape[1], generator=g, dtype=dtype)
    y, mean, invstd = torch.ops.aten.native_batch_norm(c, w, b, None, None, True, 0.1, 1e-5)
    mean2, var = torch.ops.aten.batch_norm_update_stats(c, None, None, 0.1)
    consts = bn_lif_cpu.unit_consts(shape[1], dtype)
    assert np.array_equal(bn_lif_cpu.set_batchnorm(consts, False, mean2, var, 1e-5, w, b), invstd.numpy())
    assert torch.equal(bn_lif_cpu.bn_output(c, consts), y)


def test_serves_only_what_it_computes():
    c, r, _ = _unit_inputs("spikes", 4, 2, 8, 4, torch.float32)
    lif, bn = MergedLIF(backend="cpu"), _bn(8, torch.float32, 0)
    assert unit_cpu.serves(c, bn, lif, r, None)
    assert not unit_cpu.serves(c.contiguous(), bn, lif, None, None)  # NCHW: the modules run
    assert not unit_cpu.serves(c, bn, lif, r.contiguous(), None)
    assert not unit_cpu.serves(c, bn, MergedLIF(backend="torch"), None, None)
    assert not unit_cpu.serves(c.bfloat16(), bn.bfloat16(), lif, None, None)
    assert not unit_cpu.serves(c, copy.deepcopy(bn).eval(), lif, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not unit_cpu.serves(c, bn, lif, None, None)
    with torch.no_grad():
        assert not unit_cpu.serves(c, bn, lif, None, None)


def test_first_use_check_turns_the_op_off_where_aten_rounds_otherwise(monkeypatch):
    from fullrange.kernels import bn_lif_cpu

    c, _, _ = _unit_inputs("none", 4, 2, 8, 4, torch.float32)
    lif, bn = MergedLIF(backend="cpu"), _bn(8, torch.float32, 0)
    monkeypatch.setattr(unit_cpu, "_CHECKS", {})
    assert unit_cpu._check(torch.float32) is None  # this build: fma(c, alpha, beta), as the kernel
    output = bn_lif_cpu.bn_output  # the two roundings of c * alpha + beta instead
    monkeypatch.setattr(bn_lif_cpu, "bn_output", lambda c_, k: torch.from_numpy(
        np.ascontiguousarray(output(c_, k).permute(0, 2, 3, 1).numpy() * np.float32(1 + 2 ** -22))
    ).permute(0, 3, 1, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not unit_cpu.serves(c, bn, lif, None, None)
    assert "rounds its output otherwise" in str(caught[0].message)
