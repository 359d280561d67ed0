"""The fused BatchNorm (+ residual) + LIF CPU kernel (fullrange.kernels.bn_lif_cpu, through
fullrange.models.layers.bn_lif) against nn.BatchNorm2d followed by the LIF reference loop.

The reference runs in float64, so both the fused kernel and the unfused float32 modules can be
held to it: spikes equal (inputs are drawn so that no membrane lies within 1e-3 of the
threshold, where float32 rounding may legitimately decide), gradients and running statistics to
float32 accuracy, for both resets, detached or not, with and without a residual, T = 1, 3, 4.
"""
import copy

import pytest
import torch
from torch import nn

from fullrange.models.layers import MergedLIF, bn_lif
from fullrange.neuron import lif_reference

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def one_thread():
    """The fused kernel serves one-thread processes (models.layers._fused_bn_lif)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(bn, c, T, r, lif_args):
    """float64 nn.BatchNorm2d (training) -> + r -> lif_reference: (spikes, h, bn in float64)."""
    bn64 = copy.deepcopy(bn).double()
    y = bn64(c)
    if r is not None:
        y = y + r
    spikes, h, _ = lif_reference(y.view(T, -1, *y.shape[1:]), **lif_args)
    return spikes.view(y.shape), h, bn64


def _inputs(T, B, C, H, seed, residual, lif_args):
    """channels_last c (and residual spikes) whose float64 membranes avoid the threshold by 1e-3."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C, momentum=0.1 if seed % 2 else None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.3, 0.5, generator=g)
        bn.running_mean.uniform_(-0.2, 0.2, generator=g)
    for _ in range(50):
        c = (torch.randn(T * B, C, H, H, generator=g, dtype=torch.float64) * 1.5 + 0.3).float()
        r = (torch.rand(T * B, C, H, H, generator=g) < 0.3).float() if residual else None
        _, h, _ = _reference(bn, c.double(), T, None if r is None else r.double(), lif_args)
        if (h - lif_args["threshold"]).abs().min() > 1e-3:
            cl = c.contiguous(memory_format=torch.channels_last)
            return bn, cl, None if r is None else r.contiguous(memory_format=torch.channels_last)
    raise AssertionError("no input without near-threshold membranes")


CASES = [  # (T, reset, decay, detach_reset, residual)
    (4, "hard", 0.5, False, False), (4, "soft", 0.2, False, True), (3, "hard", 0.5, True, True),
    (3, "soft", 0.5, True, False), (1, "hard", 0.5, False, True), (4, "hard", 0.9, False, True),
]


@pytest.mark.parametrize("T, reset, decay, detach, residual", CASES)
def test_fused_bn_lif_matches_float64_reference(T, reset, decay, detach, residual):
    lif_args = dict(decay=decay, threshold=1.0, reset=reset, surrogate_alpha=4.0, detach_reset=detach)
    bn, c, r = _inputs(T, 3, 8, 5, seed=T + 7 * residual, residual=residual, lif_args=lif_args)
    grad = torch.randn(c.shape, generator=torch.Generator().manual_seed(1))

    c64 = c.double().requires_grad_()
    r64 = None if r is None else r.double().requires_grad_()
    ref, _, bn64 = _reference(bn, c64, T, r64, lif_args)
    (ref * grad.double()).sum().backward()

    results = {}
    for name, fuse in (("fused", True), ("modules", False)):
        b = copy.deepcopy(bn)
        lif = MergedLIF(**lif_args)
        cc = c.clone().requires_grad_()
        rr = None if r is None else r.clone().requires_grad_()
        spikes = bn_lif(b, lif, cc, T, rr, fuse=fuse)
        (spikes * grad).sum().backward()
        results[name] = (spikes, cc.grad, b, None if rr is None else rr.grad)

    for name, (spikes, gc, b, gr) in results.items():
        assert torch.equal(spikes.double(), ref), name
        if name == "fused":
            assert spikes.is_contiguous(memory_format=torch.channels_last)
        scale = c64.grad.abs().max().item()
        assert (gc.double() - c64.grad).abs().max().item() < 2e-5 * max(1.0, scale), name
        for p, p64 in ((b.weight, bn64.weight), (b.bias, bn64.bias)):
            torch.testing.assert_close(p.grad.double(), p64.grad, rtol=2e-5, atol=2e-5 * c.shape[0], msg=name)
        torch.testing.assert_close(b.running_mean.double(), bn64.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b.running_var.double(), bn64.running_var, rtol=1e-6, atol=1e-6)
        assert b.num_batches_tracked.item() == bn64.num_batches_tracked.item() == 1
        if gr is not None:
            assert (gr.double() - r64.grad).abs().max().item() < 2e-5 * max(1.0, r64.grad.abs().max().item())


def test_fused_path_is_taken_only_where_it_serves():
    bn = nn.BatchNorm2d(4)
    lif = MergedLIF()
    cl = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    from fullrange.models import layers

    assert layers._fused_bn_lif(bn, lif, cl, None) is not None
    assert layers._fused_bn_lif(bn, lif, cl.contiguous(), None) is None  # NCHW: the modules
    assert layers._fused_bn_lif(bn.eval(), lif, cl, None) is None  # eval: running statistics
    assert layers._fused_bn_lif(bn.train(), MergedLIF(backend="torch"), cl, None) is None
    assert layers._fused_bn_lif(bn, lif, cl.double(), None) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers._fused_bn_lif(bn, lif, cl, None) is None
    torch.set_num_threads(2)
    assert layers._fused_bn_lif(bn, lif, cl, None) is None  # ATen's threaded BatchNorm is faster
