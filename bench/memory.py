"""Benchmark: activation memory of one training step per image, fullrange against SpikingJelly 2.0.

    python bench/memory.py [--cases demo,resnet19]

Per case (the demo student: T=4, batch 128, 28 px; ResNet-19: T=6, batch 16, 32 px) and per
implementation: fullrange as its trainer runs it; SpikingJelly 2.0's
build of the same network (bench/sj_models.py); and SpikingJelly with its memopt
(`optimize_memory(level=1, checkpoint_budget="memory", compress=True)`: checkpointing of every
block plus 1-bit compression of binary inputs) and, on CUDA only, at level 4 ("memopt level4":
its searches over CUDA memory, here the split along the time dimension of its convolutions and
the greedy removal of checkpoints that do not lower the peak). Two measures, per image:
  saved   bytes of the unique storages autograd keeps for the backward (checkpointing hides its
          recompute from this count, so it flatters checkpointed models);
  peak    the step's peak memory above the memory before it (peak RSS on the CPU,
          max_memory_allocated on CUDA; bench/memory_probe.py): what decides.
fullrange runs in each memory mode (model.memory: default, spikes_1bit, checkpoint) and in
spikes_1bit with its first two blocks recomputed ("spikes_1bit+2": model.recompute_blocks=2), and
in the default mode with model.stem_once false ("stem_per_step": the stem on the T copies of the
image, fullrange's default until 2026-12-06) and with model.fuse_bn_lif false ("unfused":
BatchNorm and LIF modules, which keep BatchNorm's output or the LIF's input). Last line:
`activation_peak_ratio_vs_spikingjelly_memopt=X`, SpikingJelly memopt's peak (its leaner level)
over the peak of fullrange's leanest mode, the worse (smaller) of the cases: at least 1 means
fullrange needs no more. On the CPU each (case, implementation) runs in a fresh process (the
resident set is per process); on CUDA, whose allocator counts each one's peak, one process per
case runs them one after another.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from memory_probe import peak_above, saved_bytes  # noqa: E402
from step import CASES, make_steps  # noqa: E402

from fullrange.models.memory import set_fusion  # noqa: E402

# glibc: serve every allocation above 64 KiB by mmap and unmap it when freed (a fixed threshold
# also stops glibc from raising it), so the CPU's resident set follows the live tensors.
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
IMPLS = ("fullrange", "fullrange spikes_1bit", "fullrange spikes_1bit+2", "fullrange checkpoint",
         "fullrange stem_per_step", "fullrange unfused", "spikingjelly", "spikingjelly memopt")
VARIANTS = ("fullrange stem_per_step", "fullrange unfused")  # default memory mode, one setting changed
CUDA_IMPLS = ("spikingjelly memopt level4",)  # its memory searches run on CUDA only


def build_step(case_name: str, impl: str, device: torch.device, batch: int | None = None):
    """(step, forward, B): one training step of `impl` (one of IMPLS) on case_name's network and
    a batch of B images (the case's batch, or `batch`), and its forward alone."""
    case = dict(CASES[case_name])
    if batch is not None:
        case["batch"] = case["gpu_batch"] = batch
    mode = impl.split()[1] if impl.startswith("fullrange ") and impl not in VARIANTS else "default"
    steps = make_steps(case, device, compile_sj=False, memory_modes=(mode,), peers=impl.startswith("spikingjelly"))
    B = case.get("gpu_batch", case["batch"]) if device.type == "cuda" else case["batch"]
    if impl.startswith("fullrange"):
        step = steps["fullrange" if impl in VARIANTS else impl]
        if impl == "fullrange stem_per_step":
            step.model.stem_once = False  # model.stem_once: false
        if impl == "fullrange unfused":
            set_fusion(step.model, False)  # model.fuse_bn_lif: false
        return step, step.forward, B
    step = steps["spikingjelly"]
    if impl.startswith("spikingjelly memopt"):
        from spikingjelly.activation_based import layer, memopt
        from sj_models import Basic, PreAct

        deep = impl.endswith("level4")  # + the split of its convolutions over T, then greedy unwrapping
        memopt.optimize_memory(step.model, (Basic, PreAct), lambda m: m(step.x, case["T"]), level=4 if deep else 1,
                               checkpoint_budget="memory", compress=True,
                               can_chunk=(lambda m: isinstance(m, layer.Conv2d)) if deep else None)
    return step, step.forward, B


def measure(case_name: str, impl: str) -> dict:
    """One (case, implementation) in this process: saved bytes and peak per image."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, forward, B = build_step(case_name, impl, device)
    step()  # warm-up: kernels, allocator pools
    peak, _ = peak_above(step, device)
    return {"case": case_name, "impl": impl, "saved_B_per_img": saved_bytes(forward) / B,
            "peak_MiB_per_img": peak / B, "batch": B}


def fresh_process_result(argv: list, tag: str, label: str) -> dict | None:
    """The JSON that `python *argv`, run in a fresh process with MEASURE_ENV, printed after
    `tag ` (its last such line); None, with the process's stderr printed under label, when it
    failed."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=MEASURE_ENV)
    lines = [x for x in done.stdout.splitlines() if x.startswith(tag + " ")]
    if done.returncode or not lines:
        print(f"{label}: failed\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1][len(tag) + 1:])


def measure_in_fresh_process(case: str, impl: str, threads: int) -> dict | None:
    """measure() in a fresh process (the CPU's resident set belongs to the process); None when it failed."""
    return fresh_process_result([__file__, "--one", case, impl, "--threads", str(threads)], "MEM", f"{case}/{impl}")


def measure_on_cuda(case: str, impl: str) -> dict | None:
    """measure() in this process, its memory handed back to the card afterwards; None when it failed."""
    try:
        return measure(case, impl)
    except Exception as err:  # noqa: BLE001 - one implementation failing leaves the others' numbers
        print(f"{case}/{impl}: failed: {type(err).__name__}: {err}")
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="demo,resnet19")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: one thread per process, as the CPU launch configs run)")
    p.add_argument("--one", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(args.threads)
        print("MEM " + json.dumps(measure(*args.one)))
        return
    worst = None
    cuda = torch.cuda.is_available()
    for case in args.cases.split(","):
        rows = {}
        for impl in IMPLS + (CUDA_IMPLS if cuda else ()):
            row = measure_on_cuda(case, impl) if cuda else measure_in_fresh_process(case, impl, args.threads)
            if row is None:
                continue
            rows[impl] = r = row
            print(f"{case} {impl:22s} saved {r['saved_B_per_img'] / 2**20:7.2f} MiB/img   peak "
                  f"{r['peak_MiB_per_img']:7.2f} MiB/img   (batch {r['batch']})")
        ours = {k: r["peak_MiB_per_img"] for k, r in rows.items() if k.startswith("fullrange")}
        if "fullrange" in ours:
            print(f"{case}: fullrange default peak / each mode: " + ", ".join(
                f"{k.split()[1]} {ours['fullrange'] / v:.2f}x" for k, v in ours.items() if k != "fullrange"))
        memopt = {k: r["peak_MiB_per_img"] for k, r in rows.items() if k.startswith("spikingjelly memopt")}
        if ours and memopt:
            leanest, theirs = min(ours, key=ours.get), min(memopt, key=memopt.get)
            ratio = memopt[theirs] / ours[leanest]
            print(f"{case}: SpikingJelly {theirs.split(maxsplit=1)[1]} peak / {leanest} peak = {ratio:.2f}")
            worst = ratio if worst is None else min(worst, ratio)
    print(f"activation_peak_ratio_vs_spikingjelly_memopt={worst if worst is not None else float('nan'):.3f}")


if __name__ == "__main__":
    main()
