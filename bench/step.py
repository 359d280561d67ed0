"""Benchmark: one full training step of the same student built two ways, fullrange and
SpikingJelly 2.0 (bench/sj_models.py), in one process with interleaved repeats.

    python bench/step.py [--cases demo,resnet19,preact34] [--repeats 7]

A step: forward at T, the full-range loss against fixed (cached) teacher logits, backward, the
optimizer step. fullrange runs as its trainer does (channels_last where the recipe says so,
LIF backend auto, the guarded fused SGD); SpikingJelly as a user of it would (its multi-step
layers, contiguous memory, LIFNode in its default implementation for the device, torch SGD),
plain and under torch.compile, in contiguous memory and, where fullrange runs channels_last, in
channels_last too (compiled in both on the CPU only; its best variant is the peer). Cases: the
demo student (T=4, batch 128, 28 px), ResNet-19 (T=6, batch 16, 32 px), preact ResNet-34 (T=4,
224 px; batch 2 on CPU, 64 on CUDA). The process keeps freed memory as fullrange's CPU runs do
(runtime.keep_freed_cpu_memory), for both. fullrange also runs in each memory mode
(model.memory: spikes_1bit, spikes_1bit with model.recompute_blocks=2 ("spikes_1bit+2"),
checkpoint), with model.stem_once false ("stem_per_step": the stem convolution and BatchNorm on
the T copies of the image), with model.compile (on CUDA, or with
--compile-ours), with model.fuse_bn_lif false ("unfused": BatchNorm and LIF modules instead of
the fused unit, Triton on CUDA, numba on the CPU), and with those modules and neuron.backend torch
("unfused+lif=torch": the plain torch path the LIF kernels replace), each on its own copy of the
weights.
Each case runs in a fresh process (earlier cases' memory slowed later ones). Prints per case:
median step time of each (warm-up 2 steps, then --repeats rounds round-robin),
their ratio, the step's peak memory above the memory before it (bench/memory_probe.py),
`non_conv_share`: the fraction of fullrange's step time (torch.profiler) outside convolution
forward and backward (the outermost aten convolution calls, with what runs inside them), and
the ratio fullrange would reach with that share at zero (SpikingJelly's best over fullrange's
convolution time). Last line:
`step_ratio_vs_spikingjelly=X`, the geometric mean over the cases of (SpikingJelly's best
variant time / fullrange's best of default and +compile): above 1, fullrange is faster.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_probe import peak_above  # noqa: E402

from fullrange.config import OptimConfig  # noqa: E402
from fullrange.losses import full_range_loss  # noqa: E402
from fullrange.models import build_model  # noqa: E402
from fullrange.models.memory import set_fusion, set_memory  # noqa: E402
from fullrange.neuron import LIF  # noqa: E402
from fullrange.optim import GuardedStep, build_optimizer  # noqa: E402
from fullrange.runtime import keep_freed_cpu_memory  # noqa: E402

# fullrange's memory variants: model.memory, or "spikes_1bit+N" (model.recompute_blocks=N)
MEMORY_VARIANTS = ("default", "spikes_1bit", "spikes_1bit+2", "checkpoint")

CASES = {
    "demo": dict(model="spiking_resnet_tiny", T=4, batch=128, size=28, channels=1, classes=10, channels_last=True),
    "resnet19": dict(model="spiking_resnet19_cifar", T=6, batch=16, size=32, channels=3, classes=100,
                     channels_last=True),
    "preact34": dict(model="spiking_preact_resnet34", T=4, batch=2, gpu_batch=64, size=224, channels=3,
                     classes=1000, channels_last=True),
}


class _NoScaler:
    scaler = None


def _fullrange_step(model, x, y, z_a, T):
    """One fullrange training step on `model` (as its trainer runs it: the guarded fused SGD)."""
    opt = build_optimizer(model, OptimConfig())
    guarded = GuardedStep(_NoScaler(), opt, list(model.parameters()), 0.0)

    def step():
        loss, _ = full_range_loss(model(x, T), y, z_a, tau=3.0)
        loss.backward()
        guarded()
        opt.zero_grad(set_to_none=True)
    step.model, step.x, step.forward = model, x, lambda: model(x, T)
    return step


def make_steps(case: dict, device: torch.device, compile_sj: bool, memory_modes=("default",),
               compile_ours: bool = False, kernel_variants: bool = False, peers: bool = True) -> dict:
    """name -> a callable running one training step; all on the same weights and batch. Each has
    .model, .x (its input batch) and .forward() (the model's forward alone). fullrange runs once
    per memory mode ("fullrange", "fullrange spikes_1bit", ...), and optionally compiled
    ("fullrange+compile") and with the LIF on the plain torch backend ("fullrange lif=torch").
    With peers (it needs spikingjelly), SpikingJelly's build of the network too ("spikingjelly",
    ...)."""
    g = torch.Generator().manual_seed(0)
    B = case.get("gpu_batch", case["batch"]) if device.type == "cuda" else case["batch"]
    x = torch.randn(B, case["channels"], case["size"], case["size"], generator=g).to(device)
    y = torch.randint(0, case["classes"], (B,), generator=g).to(device)
    z_a = (torch.randn(B, case["classes"], generator=g) * 3).to(device)
    torch.manual_seed(0)
    ours = build_model(case["model"], case["classes"], case["channels"]).to(device)
    x_ours = x
    if case["channels_last"]:
        ours, x_ours = ours.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    T = case["T"]
    steps = {}
    for mode in memory_modes:  # a model.memory, or "spikes_1bit+N": model.recompute_blocks=N
        name, _, blocks = mode.partition("+")
        model = ours if mode == "default" else set_memory(copy.deepcopy(ours), name, int(blocks or 0))
        steps["fullrange" if mode == "default" else f"fullrange {mode}"] = _fullrange_step(model, x_ours, y, z_a, T)
    if compile_ours:  # model.compile: true
        compiled = copy.deepcopy(ours)
        compiled.compile()
        steps["fullrange+compile"] = _fullrange_step(compiled, x_ours, y, z_a, T)
    if kernel_variants:  # the fast paths against the plain torch path they replace
        per_step = copy.deepcopy(ours)
        per_step.stem_once = False  # model.stem_once: false (the stem on the T copies of the image)
        steps["fullrange stem_per_step"] = _fullrange_step(per_step, x_ours, y, z_a, T)
        unfused = set_fusion(copy.deepcopy(ours), False)  # model.fuse_bn_lif: false
        steps["fullrange unfused"] = _fullrange_step(unfused, x_ours, y, z_a, T)
        unfused = copy.deepcopy(unfused)
        for m in unfused.modules():
            if isinstance(m, LIF):
                m.backend = "torch"  # neuron.backend: torch
        steps["fullrange unfused+lif=torch"] = _fullrange_step(unfused, x_ours, y, z_a, T)
    if not peers:
        return steps
    from sj_models import parity, sj_twin

    twin = sj_twin(case["model"], case["classes"], case["channels"]).to(device)
    assert parity(ours, twin, x[:2], case["T"]) < 1e-3, "the SpikingJelly twin is not the same network"

    def sj_step(model, compiled=False, channels_last=False):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        x_sj = x
        if channels_last:
            model, x_sj = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        run = torch.compile(model, dynamic=False) if compiled else model

        def step():
            loss, _ = full_range_loss(run(x_sj, T), y, z_a, tau=3.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step.model, step.x, step.forward = run, x_sj, lambda: run(x_sj, T)
        return step

    # SpikingJelly in contiguous memory (as its users run it) and, where fullrange runs
    # channels_last, in channels_last too (compiled in both only on the CPU: each inductor
    # compile costs a minute of a lent GPU's time): its best variant is the peer.
    layouts = (False, True) if case["channels_last"] else (False,)
    for cl in layouts:
        suffix = " channels_last" if cl else ""
        if compile_sj and not (cl and device.type == "cuda"):  # its own copy: the eager twin's
            # neuron state would invalidate the compiled guards
            steps["spikingjelly+compile" + suffix] = sj_step(copy.deepcopy(twin), compiled=True, channels_last=cl)
        steps["spikingjelly" + suffix] = sj_step(copy.deepcopy(twin), channels_last=cl)
    return steps


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def non_conv_share(step, device) -> float:
    """Fraction of the step's time outside convolution forward/backward (3 profiled steps): the
    sum of every op's self time, less the inclusive time of the outermost aten::convolution and
    aten::convolution_backward calls (so the work a convolution does inside, such as mkldnn's
    reorder of the weight gradient into the weight's layout, counts as convolution, and the
    Python autograd Functions around the convolutions do not)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    cuda = device.type == "cuda"
    events = prof.events()
    total = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
    conv = 0.0
    for e in events:
        if e.name in CONV_OPS and not _inside_conv(e):
            conv += e.device_time_total if cuda else e.cpu_time_total  # both inclusive
    return 1.0 - conv / max(total, 1e-9)


CONV_OPS = ("aten::convolution", "aten::convolution_backward")


def _inside_conv(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in CONV_OPS:
            return True
        parent = parent.cpu_parent
    return False


def run_case(name: str, case: dict, device, repeats: int, compile_sj: bool, compile_ours: bool) -> dict:
    torch._dynamo.reset()  # each case compiles afresh (guards left by an earlier case's models can fail)
    steps = make_steps(case, device, compile_sj, MEMORY_VARIANTS, compile_ours, kernel_variants=True)
    for _, step in steps.items():  # warm-up (and compile)
        for _ in range(2):
            step()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            times[k].append(timed(step, device))
    peaks = {k: peak_above(step, device)[0] for k, step in steps.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    sj_best = min(v for k, v in med.items() if k.startswith("spikingjelly"))
    ours_best = min(med["fullrange"], med.get("fullrange+compile", math.inf))  # memory modes trade speed away
    out = {"case": name, "ms": {k: 1e3 * v for k, v in med.items()}, "peak_mib": peaks,
           "ratio": sj_best / ours_best}
    out["non_conv_share"] = share = non_conv_share(steps["fullrange"], device)
    # the ratio if fullrange spent no time outside convolutions (which SpikingJelly runs the same)
    out["conv_bound"] = sj_best / (med["fullrange"] * (1.0 - share))
    return out


def geometric_mean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="demo,resnet19,preact34")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    p.add_argument("--no-compile", action="store_true", help="skip SpikingJelly under torch.compile")
    p.add_argument("--compile-ours", action="store_true",
                   help="also fullrange with model.compile (default on CUDA; on the CPU inductor's first compile takes minutes)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.cases.split(",")
    if len(names) > 1 and not args.in_process:
        # one fresh process per case: run after ResNet-19 in the same process, preact-34's default
        # fullrange step measured 605 ms against 494 ms alone (its deep copies were not slowed)
        flags = [f"--repeats={args.repeats}", f"--threads={args.threads}"] + \
            ["--no-compile"] * args.no_compile + ["--compile-ours"] * args.compile_ours
        ratios = []
        for name in names:
            done = subprocess.run([sys.executable, __file__, "--cases", name, "--in-process", *flags],
                                  capture_output=True, text=True)
            lines = done.stdout.splitlines()
            print("\n".join(line for line in lines if not line.startswith("step_ratio_vs_spikingjelly=")), flush=True)
            ratio = [line.split("=")[1] for line in lines if line.startswith("step_ratio_vs_spikingjelly=")]
            if done.returncode or not ratio:
                sys.exit(f"bench/step.py: case {name} failed\n{done.stderr[-3000:]}")
            ratios.append(float(ratio[0]))
        print(f"step_ratio_vs_spikingjelly={geometric_mean(ratios):.3f}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        keep_freed_cpu_memory()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"one training step, {where}; medians of {args.repeats} interleaved repeats")
    ratios = []
    for name in names:
        r = run_case(name, CASES[name], device, args.repeats, not args.no_compile,
                     args.compile_ours or device.type == "cuda")
        ratios.append(r["ratio"])
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in r["ms"].items())
        peaks = ", ".join(f"{k} {v:.0f} MiB" for k, v in r["peak_mib"].items())
        print(f"{name}: {times}; peak above start: {peaks}; SpikingJelly best / fullrange = {r['ratio']:.2f}x")
        cost = ", ".join(f"{k[len('fullrange'):].strip()} {v / r['ms']['fullrange']:.2f}x" for k, v in r["ms"].items()
                         if k != "fullrange" and k.startswith("fullrange"))
        print(f"{name}: step time of each fullrange variant / default: {cost}")
        print(f"{name}: non_conv_share={r['non_conv_share']:.2f} (SpikingJelly best / fullrange's convolutions alone "
              f"= {r['conv_bound']:.2f}x: the ratio with nothing else left)")
    print(f"step_ratio_vs_spikingjelly={geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
