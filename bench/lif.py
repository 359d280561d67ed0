"""Benchmark: multi-step LIF forward + backward, fullrange against its peers, in one run.

    python bench/lif.py                      # CPU: N = 2^20; CUDA: N = 2^20 and 2^24
    python bench/lif.py --n 16777216 --t 4 --dtype bfloat16 --reset soft

Implementations (each where it runs on this device):
  fullrange triton     fullrange.kernels.lif.lif_multistep_triton            (CUDA only)
  fullrange torch      fullrange.neuron.lif_multistep (the torch backend)    (if importable)
  torch loop           a plain autograd loop over T with a surrogate Function
  torch loop+compile   torch.compile of that loop
  spikingjelly         spikingjelly 2.0 functional.lif_multi_step (what LIFNode(step_mode='m')
                       runs; tau = 1/(1-decay), decay_input=False), plain and under
                       torch.compile; on CUDA also with SJ_LIF_CUDA_IMPLEMENTATION=triton / cuda
                       (read at import, so those run in child processes)

"fullrange path" is what fullrange.neuron picks on this device: the Triton kernel on CUDA,
the torch backend elsewhere; the last column is each time divided by its time.

Byte model (the minimum traffic of a fused fwd+bwd that saves one state tensor), per element
and timestep, b = bytes per element of x's dtype:
    forward  read x, write s, write h - theta          3b
    backward read g_s, read h - theta, write g_x       3b
so 6b bytes (24 B fp32, 12 B bf16) per element-step, and effective GB/s = 6b*T*N / time. The
same model is applied to every implementation (unfused ones move more bytes than it counts),
and is compared with the copy bandwidth measured in the same run (dst.copy_(src), counted as
read + write). Times are medians over repeats; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAPER = {"hard": (0.5, 1.0), "soft": (0.2, 1.0)}  # reset -> (decay, threshold)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="elements per timestep (default: 2^20 on CPU, 2^20 and 2^24 on CUDA)")
    p.add_argument("--t", type=int, default=4, help="timesteps (default 4)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="input dtypes (default: float32 on CPU, float32 and bfloat16 on CUDA)")
    p.add_argument("--reset", choices=("hard", "soft"), default="hard")
    p.add_argument("--detach-reset", action="store_true")
    p.add_argument("--alpha", type=float, default=4.0, help="sigmoid surrogate slope")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    p.add_argument("--iters", type=int, default=None, help="fwd+bwd per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--only", default=None, help="comma list of implementation names (internal)")
    p.add_argument("--sj-impl", default=None, help="SJ_LIF_CUDA_IMPLEMENTATION for this run (internal)")
    p.add_argument("--json", action="store_true", help="print rows as JSON, no table (internal)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- implementations


class _Spike(torch.autograd.Function):
    """Heaviside forward, sigmoid-surrogate backward (slope alpha)."""

    @staticmethod
    def forward(ctx, d, alpha):
        ctx.save_for_backward(d)
        ctx.alpha = alpha
        return (d >= 0).to(d.dtype)

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * d)
        return g * ctx.alpha * sig * (1 - sig), None


def torch_loop(x, decay, threshold, reset, alpha, detach_reset):
    """The textbook LIF: a Python loop over T of autograd ops (what the official code does)."""
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        h = decay * v + x[t]
        s = _Spike.apply(h - threshold, alpha)
        r = s.detach() if detach_reset else s
        v = h * (1 - r) if reset == "hard" else h - threshold * r
        out.append(s)
    return torch.stack(out)


def build_impls(args, device):
    """name -> callable(x) -> spikes, for every implementation that imports here."""
    reset, detach, alpha = args.reset, args.detach_reset, args.alpha
    decay, threshold = PAPER[reset]
    impls, skipped = {}, {}

    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # interpreter: smoke test
        try:
            from fullrange.kernels.lif import lif_multistep_triton

            impls["fullrange triton"] = lambda x: lif_multistep_triton(x, decay, threshold, reset, alpha, detach)
        except Exception as error:
            skipped["fullrange triton"] = repr(error)
    try:
        from fullrange.neuron import lif_multistep

        impls["fullrange torch"] = lambda x: lif_multistep(x, decay, threshold, reset, alpha, detach)
    except Exception as error:
        skipped["fullrange torch"] = repr(error)

    impls["torch loop"] = lambda x: torch_loop(x, decay, threshold, reset, alpha, detach)
    if not args.no_compile:
        compiled = torch.compile(torch_loop)
        impls["torch loop+compile"] = lambda x: compiled(x, decay, threshold, reset, alpha, detach)

    try:
        from spikingjelly.activation_based import functional as sj_functional
        from spikingjelly.activation_based import surrogate as sj_surrogate

        tau = 1.0 / (1.0 - decay)
        v_reset = 0.0 if reset == "hard" else None
        sg = sj_surrogate.Sigmoid(alpha=alpha)

        def sj(x):
            v0 = torch.zeros_like(x[0], dtype=torch.float32)
            return sj_functional.lif_multi_step(x, v0, tau, False, threshold, v_reset, sg, detach)[0]

        tag = f"[{args.sj_impl}]" if args.sj_impl else ""
        impls[f"spikingjelly{tag}"] = sj
        if not args.no_compile:
            impls[f"spikingjelly{tag}+compile"] = torch.compile(sj)
    except Exception as error:
        skipped["spikingjelly"] = repr(error)
    if args.only:
        wanted = args.only.split(",")
        impls = {k: v for k, v in impls.items() if re.sub(r"\[.*?\]", "", k) in wanted}
    return impls, skipped


# ---------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(step, device, iters, repeats, warmup=2):
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times), min(times)


def copy_bandwidth(device, nbytes, iters, repeats):
    """GB/s of dst.copy_(src), counted as bytes read + bytes written."""
    n = max(nbytes, 64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    med, _ = time_it(lambda: dst.copy_(src), device, iters, repeats)
    return 2 * src.numel() * 4 / med / 1e9


def run_case(impls, device, n, t, dtype, args):
    """Time fwd+bwd of each implementation; also check each against the torch loop."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.randn(t, n, generator=g) * 0.8 + 0.6).to(device=device, dtype=dtype)
    gs = torch.randn(t, n, generator=g).to(device=device, dtype=dtype)
    iters = args.iters or (5 if device.type == "cpu" else 20)

    decay, threshold = PAPER[args.reset]
    xr = x0.detach().float().clone().requires_grad_()
    ref_s = torch_loop(xr, decay, threshold, args.reset, args.alpha, args.detach_reset)
    ref_s.backward(gs.float())
    rows = []
    for name, fn in impls.items():
        x = x0.clone().requires_grad_()

        def step():
            x.grad = None
            fn(x).backward(gs)

        try:
            s = fn(x)  # also warms up compilation
            s.backward(gs)
            mismatch = int((s.float() != ref_s).sum())
            grad_err = (x.grad.float() - xr.grad).abs().max().item()
            warm = 3 if "compile" in name else 1
            med, best = time_it(step, device, iters, args.repeats, warmup=warm)
            rows.append(dict(impl=name, n=n, t=t, dtype=str(dtype).replace("torch.", ""), ms=med * 1e3,
                             best_ms=best * 1e3, spike_mismatch=mismatch, grad_err=grad_err))
        except Exception as error:
            rows.append(dict(impl=name, n=n, t=t, dtype=str(dtype).replace("torch.", ""), error=repr(error)[:200]))
    return rows


def sj_child_rows(args, n_list, dtypes):
    """On CUDA: SpikingJelly with each forced implementation, in a child process each."""
    rows = []
    for impl in ("triton", "cuda"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "spikingjelly,spikingjelly+compile",
               "--sj-impl", impl, "--json", "--t", str(args.t), "--reset", args.reset,
               "--alpha", str(args.alpha), "--repeats", str(args.repeats), "--n", *map(str, n_list),
               "--dtype", *dtypes] + (["--detach-reset"] if args.detach_reset else []) + \
              (["--no-compile"] if args.no_compile else []) + (["--iters", str(args.iters)] if args.iters else [])
        env = dict(os.environ, SJ_LIF_CUDA_IMPLEMENTATION=impl)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode == 0 and lines:
            rows += json.loads(lines[-1][5:])["rows"]
        else:
            rows.append(dict(impl=f"spikingjelly[{impl}]", n=n_list[0], t=args.t, dtype=dtypes[0],
                             error=(proc.stderr.strip().splitlines() or ["?"])[-1][:200]))
    return rows


# ---------------------------------------------------------------- report


def print_table(rows, copy_gbps, device, args, skipped):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    ours = "fullrange triton" if device.type == "cuda" else "fullrange torch"
    title = (f"LIF fwd+bwd, T={args.t}, reset={args.reset}{' (detached)' if args.detach_reset else ''}, "
             f"on {device_name(device)}; copy bandwidth {copy_gbps:.1f} GB/s")
    table = Table(title=title)
    for col in ("N", "dtype", "implementation", "ms (median)", "ms (best)", "GB/s (6b*T*N)",
                "of copy BW", f"time / {ours}", "spikes == ref", "max |dx - ref|"):
        table.add_column(col, justify="left" if col in ("implementation", "dtype") else "right",
                         no_wrap=col == "implementation")
    by_case = {}
    for r in rows:
        by_case.setdefault((r["n"], r["dtype"]), []).append(r)
    for (n, dt), case_rows in by_case.items():
        base = next((r["ms"] for r in case_rows if r["impl"] == ours and "ms" in r), None)
        b = torch.empty((), dtype=DTYPES[dt]).element_size()
        for r in case_rows:
            if "error" in r:
                table.add_row(f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n), dt, r["impl"],
                              "[red]failed[/red]", "", "", "", "", "", r["error"][:60])
                continue
            gbps = 6 * b * r["t"] * n / (r["ms"] * 1e-3) / 1e9
            table.add_row(
                f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n), dt, r["impl"],
                f"{r['ms']:.2f}", f"{r['best_ms']:.2f}", f"{gbps:.1f}", f"{gbps / copy_gbps:.0%}",
                f"{r['ms'] / base:.2f}x" if base else "-",
                "yes" if r["spike_mismatch"] == 0 else f"[red]{r['spike_mismatch']} differ[/red]",
                f"{r['grad_err']:.1e}",
            )
        table.add_section()
    console.print(table)
    for name, why in skipped.items():
        console.print(f"[yellow]skipped {name}: {why}[/yellow]")
    console.print("Times are medians of repeats on a possibly shared machine: treat small differences as noise.")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    n_list = args.n or ([1 << 20] if device.type == "cpu" else [1 << 20, 1 << 24])
    dtypes = args.dtype or (["float32"] if device.type == "cpu" else ["float32", "bfloat16"])
    impls, skipped = build_impls(args, device)
    rows = []
    for n in n_list:
        for dt in dtypes:
            rows += run_case(impls, device, n, args.t, DTYPES[dt], args)
    if args.json:
        print("ROWS " + json.dumps({"rows": rows}))
        return
    if device.type == "cuda":
        rows += sj_child_rows(args, n_list, dtypes)
    biggest = max(n_list) * args.t * 4
    copy_gbps = copy_bandwidth(device, biggest, args.iters or (5 if device.type == "cpu" else 20), args.repeats)
    rows.sort(key=lambda r: (r["n"], r["dtype"]))
    print_table(rows, copy_gbps, device, args, skipped)


if __name__ == "__main__":
    main()
