"""Tests for fullrange.kernels.lif (the Triton multi-step LIF) against an independent reference.

The Triton kernels run on CPU only under TRITON_INTERPRET=1, which triton reads when a kernel
is decorated. So all kernel work happens in ONE subprocess (this file run as a script with
``--worker``), started with the variable set, whatever the pytest process has imported
already; it prints a JSON report that the tests below read. Two more small subprocesses check
the error paths (no triton, CPU tensor without the interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 300

# (name, dtype, T, inner shape, reset, detach_reset, decay, threshold, alpha)
PAPER_HARD = (0.5, 1.0, 4.0)  # CIFAR/DVS
PAPER_SOFT = (0.2, 1.0, 4.0)  # ImageNet
CASES = []
for _reset, _params in (("hard", PAPER_HARD), ("soft", PAPER_SOFT)):
    for _detach in (False, True):
        for _t in (1, 2, 4, 6):
            for _n in (1, 4097):
                CASES.append((f"fp32-{_reset}-detach{int(_detach)}-T{_t}-N{_n}", "float32", _t,
                              [_n], _reset, _detach, *_params))
# Runtime parameters away from the paper's values, and a [T, B, C, H, W]-like shape.
CASES += [
    ("fp32-hard-params-5d", "float32", 3, [2, 3, 5, 7], "hard", False, 0.9, 0.7, 2.5),
    ("fp32-soft-params-5d", "float32", 5, [2, 3, 5, 7], "soft", False, 0.75, 1.3, 6.0),
    ("fp32-soft-detach-params", "float32", 4, [300], "soft", True, 0.3, 0.5, 1.0),
]
LOW_PRECISION = [
    (f"{dt}-{r}-detach{int(dt_)}-T4-N4097", dt, 4, [4097], r, dt_, *p)
    for dt in ("bfloat16", "float16")
    for r, p in (("hard", PAPER_HARD), ("soft", PAPER_SOFT))
    for dt_ in (False, True)
]
FP32_TOL = 1e-5
# bf16 stores h - theta and g_x with 8 significant bits, fp16 with 11; the reference is fp32 on
# the same (upcast) inputs and incoming gradients. Max |grad error| / max |grad| measured under
# the interpreter: bf16 4e-3 .. 7e-3, fp16 3e-4 .. 4.5e-4.
LOW_TOL = {"bfloat16": 1.5e-2, "float16": 2e-3}


# ---------------------------------------------------------------- worker (runs in a subprocess)


def _case_inputs(dtype, t, inner, threshold, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, *inner, generator=g) * 0.8 + 0.6
    flat = x.view(t, -1)
    flat[0, ::7] = threshold  # h == theta exactly at t = 0: must spike (h >= theta)
    grad_s = torch.randn(t, *inner, generator=g)
    dt = getattr(torch, dtype)
    return x.to(dt), grad_s.to(dt)


def _run_case(case, seed):
    import torch
    from fullrange.kernels.lif import _lif_fwd, lif_multistep_triton
    from fullrange.neuron import lif_reference

    name, dtype, t, inner, reset, detach, decay, threshold, alpha = case
    x, grad_s = _case_inputs(dtype, t, inner, threshold, seed)
    xk = x.clone().requires_grad_()
    spikes = lif_multistep_triton(xk, decay, threshold, reset, alpha, detach)
    spikes.backward(grad_s)
    _, state = _lif_fwd(x, decay, threshold, reset == "soft", alpha, detach, True)

    xr = x.float().requires_grad_()
    ref_s, ref_h, _ = lif_reference(xr, decay, threshold, reset, alpha, detach)
    ref_s.backward(grad_s.float())
    low = dtype != "float32"
    ref_d = ref_h.detach() - threshold
    return {
        "shape_ok": spikes.shape == x.shape and xk.grad.shape == x.shape,
        "dtype_ok": spikes.dtype == x.dtype and state.dtype == x.dtype and xk.grad.dtype == x.dtype,
        "spike_rate": ref_s.float().mean().item(),
        "spike_mismatch": int((spikes.float() != ref_s).sum()),
        "state_err": (state.float() - ref_d).abs().max().item(),
        # |error| in units of the input dtype's relative precision at each value of h - theta
        "state_err_ulp": ((state.float() - ref_d).abs() / (torch.finfo(x.dtype).eps * ref_d.abs() + 2**-24))
        .max().item() if low else None,
        "grad_err": (xk.grad.float() - xr.grad).abs().max().item(),
        "grad_scale": xr.grad.abs().max().item(),
    }


def _extra_checks():
    import torch
    from fullrange.kernels.lif import _lif_bwd, _lif_fwd, lif_multistep_triton
    from fullrange.neuron import lif_reference

    out = {}
    x, grad_s = _case_inputs("float32", 4, [3, 33], 1.0, seed=7)
    # No grad needed -> no state is written; spikes unchanged.
    with torch.no_grad():
        s_nograd = lif_multistep_triton(x.clone().requires_grad_(), 0.5, 1.0, "hard", 4.0, False)
    s_ref = lif_reference(x, 0.5, 1.0, "hard", 4.0, False)[0]
    _, state = _lif_fwd(x, 0.5, 1.0, False, 4.0, False, False)
    out["nograd_spikes_equal"] = bool(torch.equal(s_nograd, s_ref))
    out["nograd_state_empty"] = state.numel() == 0

    # A non-contiguous input (time-major view of a batch-major tensor) and a T = 0 input.
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    out["noncontig_equal"] = bool(torch.equal(lif_multistep_triton(xt, 0.5, 1.0, "hard", 4.0, False), s_ref))
    out["empty_ok"] = lif_multistep_triton(x[:0], 0.5, 1.0, "hard", 4.0, False).shape == x[:0].shape

    # torch.library consistency: schema, fake tensors, autograd registration, aot dispatch.
    small = x[:2, :, :5].contiguous().requires_grad_()
    for label, op, args in (
        ("opcheck_fwd", _lif_fwd, (small, 0.5, 1.0, False, 4.0, False, True)),
        ("opcheck_fwd_soft", _lif_fwd, (small, 0.2, 1.0, True, 4.0, True, True)),
        ("opcheck_bwd", _lif_bwd, (grad_s[:2, :, :5].contiguous(), small.detach() - 1.0, 0.5, 1.0, False, 4.0, False)),
    ):
        try:
            torch.library.opcheck(op, args)
            out[label] = "ok"
        except Exception as error:  # reported by the test
            out[label] = f"{type(error).__name__}: {error}"

    # torch.compile traces the op with fullgraph (aot_eager: no C++ build on a CI box).
    def loss(inp):
        return (lif_multistep_triton(inp, 0.5, 1.0, "hard", 4.0, False) * grad_s).sum()

    try:
        xe = x.clone().requires_grad_()
        loss(xe).backward()
        xc = x.clone().requires_grad_()
        torch.compile(loss, backend="aot_eager", fullgraph=True)(xc).backward()
        out["compile_grad_err"] = (xc.grad - xe.grad).abs().max().item()
    except Exception as error:
        out["compile_grad_err"] = f"{type(error).__name__}: {error}"
    return out


def _worker_main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run with TRITON_INTERPRET=1"
    import torch

    torch.set_num_threads(1)
    report = {"cases": {}, "extra": {}}
    for i, case in enumerate(CASES + LOW_PRECISION):
        report["cases"][case[0]] = _run_case(case, seed=1000 + i)
    report["extra"] = _extra_checks()
    print("LIF_REPORT " + json.dumps(report))


# ---------------------------------------------------------------- tests (pytest process)


def _python(code_or_args, env_update, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report():
    proc = _python([str(Path(__file__).resolve()), "--worker"], {"TRITON_INTERPRET": "1"}, WORKER_TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LIF_REPORT ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("LIF_REPORT "):])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_reference(report, case):
    r = report["cases"][case[0]]
    assert r["shape_ok"] and r["dtype_ok"]
    assert r["spike_mismatch"] == 0, r
    assert r["state_err"] <= FP32_TOL, r
    assert r["grad_err"] <= FP32_TOL, r  # absolute, with |grad| up to ~4


def test_cases_fire(report):
    rates = [r["spike_rate"] for name, r in report["cases"].items() if not name.endswith("-N1")]
    assert all(0.05 < rate < 0.95 for rate in rates), rates  # both branches exercised


@pytest.mark.parametrize("case", LOW_PRECISION, ids=[c[0] for c in LOW_PRECISION])
def test_low_precision(report, case):
    r = report["cases"][case[0]]
    assert r["shape_ok"] and r["dtype_ok"]
    assert r["spike_mismatch"] == 0, r  # state is fp32 in registers: spikes are exact
    # h - theta is rounded once from fp32. The interpreter truncates fp32 -> bf16 (a GPU rounds
    # to nearest even), so allow one unit of the dtype's precision, not exact equality.
    assert r["state_err_ulp"] <= 1.0, r
    assert r["grad_err"] <= LOW_TOL[case[1]] * max(1.0, r["grad_scale"]), r


def test_no_grad_and_layouts(report):
    e = report["extra"]
    assert e["nograd_spikes_equal"] and e["nograd_state_empty"]
    assert e["noncontig_equal"] and e["empty_ok"]


@pytest.mark.parametrize("label", ["opcheck_fwd", "opcheck_fwd_soft", "opcheck_bwd"])
def test_opcheck(report, label):
    assert report["extra"][label] == "ok", report["extra"][label]


def test_torch_compile(report):
    err = report["extra"]["compile_grad_err"]
    assert isinstance(err, float) and err <= 1e-6, err


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fullrange.kernels, fullrange.kernels.lif as lif\n"
        "assert not lif.triton_available()\n"
        "try:\n"
        "    lif.lif_multistep_triton(torch.zeros(2, 3), 0.5, 1.0, 'hard', 4.0, False)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not importable' in str(e), e; print('OK')\n"
    )
    proc = _python(["-c", code], {}, 120)
    assert proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_cpu_tensor_without_interpreter_fails_clearly():
    code = (
        "import torch\n"
        "from fullrange.kernels import lif_multistep_triton\n"
        "try:\n"
        "    lif_multistep_triton(torch.zeros(2, 3), 0.5, 1.0, 'hard', 4.0, False)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs a GPU tensor' in str(e), e; print('OK')\n"
        "try:\n"
        "    lif_multistep_triton(torch.zeros(2, 3), 0.5, 1.0, 'bogus', 4.0, False)\n"
        "except ValueError as e:\n"
        "    print('OK')\n"
    )
    proc = _python(["-c", code], {}, 120)
    assert proc.stdout.split() == ["OK", "OK"], proc.stderr[-3000:]


def test_first_use_check_and_fallback():
    """The first use of the Triton kernel on a device compiles it and compares it with the torch
    backend (here the interpreter on the CPU). A kernel that disagrees (a stand-in that drops
    the reset) makes backend='triton' raise and is never used; a kernel that fails the same way
    on an unusable device (a CPU tensor without the interpreter) is reported, not used."""
    code = (
        "import torch, warnings\n"
        "from fullrange import neuron\n"
        "cpu = torch.device('cpu')\n"
        "assert neuron._triton_unusable(cpu) is None\n"
        "x = torch.randn(3, 50) + 0.5\n"
        "assert neuron.resolve_backend('triton', x) == 'triton'\n"
        "def no_reset(x, decay, threshold, reset, alpha, detach):\n"
        "    return neuron.lif_multistep(x, decay, threshold, reset, alpha, detach) * 0 + (x >= threshold).to(x.dtype)\n"
        "neuron._IMPORTED['triton'] = (no_reset, None); neuron._TRITON_CHECKS.clear()\n"
        "why = neuron._triton_unusable(cpu); assert why and 'spikes differ' in why, why\n"
        "try:\n"
        "    neuron.lif(x, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'spikes differ' in str(e), e; print('RAISED')\n"
    )
    proc = _python(["-c", code], {"TRITON_INTERPRET": "1"}, 240)
    assert proc.stdout.split() == ["RAISED"], proc.stderr[-3000:]
    code = ("import torch\nfrom fullrange import neuron\n"
            "why = neuron._triton_unusable(torch.device('cpu')); assert 'needs a GPU tensor' in why, why; print('OK')\n")
    proc = _python(["-c", code], {}, 120)
    assert proc.stdout.split() == ["OK"], proc.stderr[-3000:]


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
