"""The fused BatchNorm (+ residual) + LIF Triton kernel (fullrange.kernels.bn_lif) against
nn.BatchNorm2d followed by the LIF reference loop, in float64.

The kernels run on the CPU only under TRITON_INTERPRET=1, read when triton decorates them, so
the kernel work runs in one subprocess (this file as a script with --worker) and prints a JSON
report the tests read. Inputs are drawn so that no float64 membrane lies within 1e-3 of the
threshold (where float32 rounding may legitimately decide), so spikes must be equal; gradients,
the affine parameters' gradients and the running statistics to float32 accuracy (bfloat16
input: to its 8 significant bits). Where the kernel does not serve (the CPU, eval mode, ...)
models.layers.bn_lif runs the modules.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = [  # (name, T, B, C, H, reset, decay, detach_reset, residual, dtype)
    ("T4-hard", 4, 3, 8, 5, "hard", 0.5, False, False, "float32"),
    ("T4-soft-residual", 4, 3, 8, 5, "soft", 0.2, False, True, "float32"),
    ("T3-hard-detach-residual", 3, 3, 8, 5, "hard", 0.5, True, True, "float32"),
    ("T3-soft-detach", 3, 3, 8, 5, "soft", 0.5, True, False, "float32"),
    ("T1-hard-residual", 1, 3, 8, 5, "hard", 0.5, False, True, "float32"),
    ("T2-C70-two-channel-blocks", 2, 1, 70, 3, "hard", 0.9, False, True, "float32"),
    ("T4-bf16-residual", 4, 3, 8, 5, "hard", 0.5, False, True, "bfloat16"),
]


def _reference(bn, c, T, r, lif_args):
    """float64 nn.BatchNorm2d (training) -> + r -> lif_reference: (spikes, h, bn in float64)."""
    import copy

    from fullrange.neuron import lif_reference

    bn64 = copy.deepcopy(bn).double()
    y = bn64(c)
    if r is not None:
        y = y + r
    spikes, h, _ = lif_reference(y.view(T, -1, *y.shape[1:]), **lif_args)
    return spikes.view(y.shape), h, bn64


def _inputs(T, B, C, H, seed, residual, lif_args):
    """channels_last c (and residual spikes) whose float64 membranes avoid the threshold by 1e-3."""
    import torch
    from torch import nn

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


def _worker() -> None:
    import copy

    import torch

    from fullrange.kernels.bn_lif import bn_lif_triton

    report = {}
    for name, T, B, C, H, reset, decay, detach, residual, dtype in CASES:
        lif_args = dict(decay=decay, threshold=1.0, reset=reset, surrogate_alpha=4.0, detach_reset=detach)
        bn, c, r = _inputs(T, B, C, H, seed=T + 7 * residual + C, residual=residual, lif_args=lif_args)
        dt = getattr(torch, dtype)
        c = c.to(dt)  # bf16: the reference sees the same rounded values
        grad = torch.randn(c.shape, generator=torch.Generator().manual_seed(1)).to(dt)
        c64 = c.double().requires_grad_()
        r64 = None if r is None else r.double().requires_grad_()
        ref, _, bn64 = _reference(bn, c64, T, r64, lif_args)
        (ref * grad.double()).sum().backward()

        b = copy.deepcopy(bn)
        cc = c.clone().requires_grad_()
        rr = None if r is None else r.clone().requires_grad_()
        spikes = bn_lif_triton(cc, b, T, residual=rr, **lif_args)
        (spikes * grad).sum().backward()
        err = lambda a, ref_: (a.double() - ref_).abs().max().item() / max(1.0, ref_.abs().max().item())  # noqa: E731
        report[name] = {
            "spike_mismatch": int((spikes.double() != ref).sum()), "spike_rate": ref.mean().item(),
            "channels_last": spikes.is_contiguous(memory_format=torch.channels_last), "dtype": str(spikes.dtype),
            "grad_dtype": str(cc.grad.dtype), "grad_c": err(cc.grad, c64.grad),
            "grad_w": err(b.weight.grad, bn64.weight.grad), "grad_b": err(b.bias.grad, bn64.bias.grad),
            "grad_r": None if rr is None else err(rr.grad, r64.grad),
            "running_mean": err(b.running_mean, bn64.running_mean), "running_var": err(b.running_var, bn64.running_var),
            "batches_tracked": [b.num_batches_tracked.item(), bn64.num_batches_tracked.item()],
        }
    # The statistics alone on a tensor of many row tiles and programs (36000 rows, the last
    # tile partial), far from zero mean: Chan's merge against float64.
    from fullrange.kernels.bn_lif import _statistics

    g = torch.Generator().manual_seed(3)
    big = (torch.randn(40, 3, 30, 30, generator=g, dtype=torch.float64) * 0.5 + 100.0).float()
    mean, invstd, unbiased = _statistics(big.contiguous(memory_format=torch.channels_last), 1e-5)
    ref = big.double()
    ref_var = ref.var(dim=(0, 2, 3), unbiased=False)
    report["statistics"] = {"mean_rel": (mean / ref.mean(dim=(0, 2, 3)) - 1).abs().max().item(),
                            "var_rel": ((1 / invstd**2 - 1e-5) / ref_var - 1).abs().max().item(),
                            "unbiased_rel": (unbiased / ref.var(dim=(0, 2, 3)) - 1).abs().max().item()}
    from fullrange.models.layers import _triton_fused_check

    report["self_check"] = _triton_fused_check(torch.device("cpu"))  # the first-use check itself
    print("REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_bn_lif_matches_float64_reference(report, case):
    r = report[case[0]]
    low = case[-1] != "float32"
    tol = 1e-2 if low else 2e-5
    assert r["spike_mismatch"] == 0 and 0.05 < r["spike_rate"] < 0.95, r
    assert r["channels_last"] and r["dtype"] == r["grad_dtype"] == f"torch.{case[-1]}", r
    assert r["grad_c"] < tol and r["grad_w"] < tol and r["grad_b"] < tol, r
    assert r["grad_r"] is None or r["grad_r"] < tol, r
    assert r["running_mean"] < 1e-6 and r["running_var"] < 1e-6, r
    assert r["batches_tracked"] == [1, 1], r


def test_first_use_check_passes(report):
    assert report["self_check"] is None


def test_statistics_merge_many_tiles(report):
    r = report["statistics"]
    assert r["mean_rel"] < 1e-6 and r["var_rel"] < 1e-4 and r["unbiased_rel"] < 1e-4, r


def test_the_modules_run_where_the_kernel_does_not_serve():
    import torch
    from torch import nn

    from fullrange.models import layers

    bn, lif = nn.BatchNorm2d(4), layers.MergedLIF()
    cl = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert layers._fused_bn_lif(bn, lif, cl, None) is None  # a CPU tensor: the modules
    c = cl.clone().requires_grad_()
    spikes = layers.bn_lif(bn, lif, c, 2)
    reference = layers.MergedLIF()(nn.BatchNorm2d(4)(cl), 2)
    assert torch.equal(spikes, reference) and spikes.grad_fn is not None


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
