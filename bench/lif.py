"""Benchmark: multi-step LIF forward + backward, fullrange against its peers, in one run.

    python bench/lif.py                      # CPU: N = 2^20; CUDA: N = 2^20 and 2^24
    python bench/lif.py --n 16777216 --t 4 --dtype bfloat16 --reset soft

Implementations (each where it runs on this device):
  fullrange triton     fullrange.kernels.lif.lif_multistep_triton            (CUDA only)
  fullrange cpu        fullrange.kernels.lif_cpu.lif_multistep_cpu (fused numba kernel; CPU
                       float32/float64, what backend "auto" runs on CPU)
  fullrange torch      fullrange.neuron.lif_multistep (the torch backend)    (if importable)
  torch loop           a plain autograd loop over T with a surrogate Function
  torch loop+compile   torch.compile of that loop
  spikingjelly         spikingjelly 2.0 functional.lif_multi_step (what LIFNode(step_mode='m')
                       runs; tau = 1/(1-decay), decay_input=False), plain and under
                       torch.compile; on CUDA also with SJ_LIF_CUDA_IMPLEMENTATION=triton / cuda
                       (read at import, so those run in child processes)

"ours" is what fullrange.neuron's backend "auto" picks on this device: the Triton kernel on
CUDA, the fused CPU kernel on CPU (the torch backend where it is unavailable); the column
"time / ours" divides each time by its time, and the line below the table gives
spikingjelly+compile's time over ours (the CPU goal of fullrange's issue 5: >= 1.2x).

Byte model (the least traffic any fused fwd+bwd must move), per element and timestep, with
b = bytes per element of x's dtype:
    forward  read x, write s                              2b
    backward read g_s, read x (or a saved state), write g_x   3b
so 5b bytes (20 B fp32, 10 B bf16) per element-step, and effective GB/s = 5b*T*N / time. The
same model is applied to every implementation (ones that save h - theta, like the Triton
kernel, move 6b; unfused ones more), and is compared with the copy bandwidth measured in the
same run (dst.copy_(src), counted as read + write).

Timing: every implementation is warmed up (two untimed rounds), then the timed repeats go
round-robin over the implementations (repeat 1 of each, repeat 2 of each, ...; a repeat is
--iters fwd+bwd steps, 10 on CPU), so load from other processes on a
shared machine falls on all of them alike; times are medians over repeats (best in a column
beside). On CPU the table also gives minor page faults per step: each fresh output buffer
the allocator takes from the OS costs a fault per 4 KiB page, and glibc's heap trimming makes
that depend on the allocation pattern. --steady-malloc stops glibc returning freed memory
(mallopt M_TRIM_THRESHOLD / M_MMAP_THRESHOLD), which removes most of them for every
implementation (what a process-wide allocator setting, or jemalloc/tcmalloc, would give).

Saved memory: the bytes autograd keeps for the backward (torch.autograd.graph
saved_tensors_hooks around one forward), per element-step: all storages it holds, and the
ones other than x's (x may be alive anyway, e.g. on a residual path).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fullrange.neuron import lif_reference  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OURS = ("fullrange triton", "fullrange cpu", "fullrange torch")  # preference: what "auto" runs
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
    p.add_argument("--steady-malloc", action="store_true",
                   help="CPU: keep freed memory in the process (glibc mallopt), no page faults")
    p.add_argument("--iters", type=int, default=None, help="fwd+bwd per timed repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 11 on CPU, 5 on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--only", default=None, help="comma list of implementation names (internal)")
    p.add_argument("--sj-impl", default=None, help="SJ_LIF_CUDA_IMPLEMENTATION for this run (internal)")
    p.add_argument("--json", action="store_true", help="print rows as JSON, no table (internal)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- implementations


def torch_loop(x, decay, threshold, reset, alpha, detach_reset):
    """The textbook LIF, fullrange.neuron.lif_reference: a Python loop over T of autograd ops
    (what the official code does); the timed peer and the check of every other row."""
    return lif_reference(x, decay, threshold, reset, alpha, detach_reset)[0]


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
    if device.type == "cpu":
        try:
            from fullrange.kernels.lif_cpu import cpu_kernel_error, lif_multistep_cpu

            if cpu_kernel_error():
                raise RuntimeError(cpu_kernel_error())
            impls["fullrange cpu"] = lambda x: lif_multistep_cpu(x, decay, threshold, reset, alpha, detach)
        except Exception as error:
            skipped["fullrange cpu"] = repr(error)
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


def _minor_faults():
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except Exception:  # not on this platform
        return 0


def copy_bandwidth(device, nbytes, iters, repeats):
    """GB/s of dst.copy_(src), counted as bytes read + bytes written."""
    n = max(nbytes, 64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    med, _ = time_it(lambda: dst.copy_(src), device, iters, repeats)
    return 2 * src.numel() * 4 / med / 1e9


def saved_bytes(fn, x):
    """Bytes autograd saves in one forward of fn(x): (all storages, storages other than x's)."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    storages = {}
    for t in packed:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    del out, packed
    total = sum(storages.values())
    return total, total - storages.get(x.untyped_storage().data_ptr(), 0)


def run_case(impls, device, n, t, dtype, args):
    repeats = args.repeats or (11 if device.type == "cpu" else 5)
    """Time fwd+bwd of each implementation, round-robin; check each against the torch loop."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.randn(t, n, generator=g) * 0.8 + 0.6).to(device=device, dtype=dtype)
    gs = torch.randn(t, n, generator=g).to(device=device, dtype=dtype)
    iters = args.iters or (10 if device.type == "cpu" else 20)

    decay, threshold = PAPER[args.reset]
    xr = x0.detach().float().clone().requires_grad_()
    ref_s = torch_loop(xr, decay, threshold, args.reset, args.alpha, args.detach_reset)
    ref_s.backward(gs.float())
    rows, steps = {}, {}
    for name, fn in impls.items():
        if name == "fullrange cpu" and dtype not in (torch.float32, torch.float64):
            continue  # the fused CPU kernel takes fp32/fp64; "auto" runs the torch backend here
        row = dict(impl=name, n=n, t=t, dtype=str(dtype).replace("torch.", ""))
        rows[name] = row
        x = x0.clone().requires_grad_()

        def step(fn=fn, x=x):
            x.grad = None
            fn(x).backward(gs)

        try:
            s = fn(x)  # also warms up compilation
            s.backward(gs)
            row["spike_mismatch"] = int((s.float() != ref_s).sum())
            row["grad_err"] = (x.grad.float() - xr.grad).abs().max().item()
            del s
            x.grad = None
            row["saved_total"], row["saved_new"] = saved_bytes(fn, x)
            for _ in range(3 if "compile" in name else 1):
                step()
            steps[name] = step
        except Exception as error:
            row["error"] = repr(error)[:200]
    for _ in range(2):  # untimed rounds: every implementation's allocations settle in together
        for step in steps.values():
            for _ in range(iters):
                step()
    times = {name: [] for name in steps}
    faults = {name: 0 for name in steps}
    for _ in range(repeats):  # round-robin: load on a shared machine hits all alike
        for name, step in steps.items():
            _sync(device)
            f0 = _minor_faults()
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / iters)
            faults[name] += _minor_faults() - f0
    for name in steps:
        rows[name].update(ms=statistics.median(times[name]) * 1e3, best_ms=min(times[name]) * 1e3,
                          faults=faults[name] / (repeats * iters))
    return list(rows.values())


def sj_child_rows(args, n_list, dtypes):
    """On CUDA: SpikingJelly with each forced implementation, in a child process each."""
    rows = []
    for impl in ("triton", "cuda"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "spikingjelly,spikingjelly+compile",
               "--sj-impl", impl, "--json", "--t", str(args.t), "--reset", args.reset,
               "--alpha", str(args.alpha), "--repeats", str(args.repeats or 5), "--n", *map(str, n_list),
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

    console = Console(width=None if sys.stdout.isatty() else 190)
    malloc = ", steady malloc" if args.steady_malloc else ""
    title = (f"LIF fwd+bwd, T={args.t}, reset={args.reset}{' (detached)' if args.detach_reset else ''}, "
             f"on {device_name(device)}{malloc}; copy bandwidth {copy_gbps:.1f} GB/s")
    table = Table(title=title)
    cols = ["N", "dtype", "implementation", "ms (median)", "ms (best)", "GB/s (5b*T*N)", "of copy BW",
            "time / ours", "saved B/elem-step (new)", "spikes == ref", "max |dx - ref|"]
    if device.type == "cpu":
        cols.insert(7, "faults/step")
    for col in cols:
        table.add_column(col, justify="left" if col in ("implementation", "dtype") else "right",
                         no_wrap=col == "implementation")
    by_case = {}
    for r in rows:
        by_case.setdefault((r["n"], r["dtype"]), []).append(r)
    summary = []
    for (n, dt), case_rows in by_case.items():
        names = {r["impl"] for r in case_rows if "ms" in r}
        ours = next((k for k in OURS if k in names), None)  # what backend "auto" runs here
        base = next((r["ms"] for r in case_rows if r["impl"] == ours), None)
        b = torch.empty((), dtype=DTYPES[dt]).element_size()
        size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
        for r in case_rows:
            if "ms" not in r:
                cells = [size, dt, r["impl"], "[red]failed[/red]"] + [""] * (len(cols) - 5)
                table.add_row(*cells, r.get("error", "?")[:60])
                continue
            gbps = 5 * b * r["t"] * n / (r["ms"] * 1e-3) / 1e9
            per = r["t"] * n
            name = r["impl"] + (" (ours)" if r["impl"] == ours else "")
            cells = [size, dt, name, f"{r['ms']:.2f}", f"{r['best_ms']:.2f}", f"{gbps:.1f}",
                     f"{gbps / copy_gbps:.0%}"]
            if device.type == "cpu":
                cells.append(f"{r['faults']:.0f}")
            cells += [f"{r['ms'] / base:.2f}x" if base else "-",
                      f"{r['saved_total'] / per:.1f} ({r['saved_new'] / per:.1f})",
                      "yes" if r["spike_mismatch"] == 0 else f"[red]{r['spike_mismatch']} differ[/red]",
                      f"{r['grad_err']:.1e}"]
            table.add_row(*cells)
        table.add_section()
        peer = next((r["ms"] for r in case_rows if r["impl"] == "spikingjelly+compile" and "ms" in r), None)
        if base and peer:
            summary.append(f"N={size} {dt}: spikingjelly+compile / {ours} = {peer / base:.2f}x "
                           f"(median times; best times {_best_ratio(case_rows, ours):.2f}x)")
    console.print(table)
    for line in summary:
        console.print(line)
    for name, why in skipped.items():
        console.print(f"[yellow]skipped {name}: {why}[/yellow]")
    console.print("Times are medians of round-robin repeats on a possibly shared machine: treat small "
                  "differences as noise.")


def _best_ratio(case_rows, ours):
    best = {r["impl"]: r["best_ms"] for r in case_rows if "best_ms" in r}
    return best["spikingjelly+compile"] / best[ours]


def steady_malloc():
    """Make glibc keep freed memory (no trimming, no mmap for blocks up to 32 MiB)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    if not ok:
        raise RuntimeError("mallopt failed (not glibc?)")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if args.steady_malloc:
            steady_malloc()
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
    copy_gbps = copy_bandwidth(device, biggest, args.iters or (5 if device.type == "cpu" else 20),
                               args.repeats or 5)
    rows.sort(key=lambda r: (r["n"], r["dtype"]))
    print_table(rows, copy_gbps, device, args, skipped)


if __name__ == "__main__":
    main()
