"""Benchmark: the largest batch whose training step fits in one device's memory, fullrange's
memory modes against SpikingJelly 2.0 (its default, and its memopt), on the same network.

    python bench/max_batch.py [--case preact34] [--impls fullrange,spikingjelly] [--budget-gib G]

The question a user with one card asks: at T=4, how many more images per step does fullrange fit?
Per implementation (bench/memory.py's builds and names), in a fresh process:
1. two training steps at batch b and at 2b (b = --probe-batch). The peak memory in use (CUDA's
   allocated bytes, the CPU's resident set) grows linearly with the batch: fixed + per_image * B;
2. the batch that line predicts for the budget: (budget - fixed) / per_image;
3. probes from there: a batch fits when two training steps at it run within the budget (CUDA:
   without OutOfMemoryError; CPU: peak resident set <= budget), growing while batches fit and
   shrinking while they do not (by 10%, then 21%, 46%, ...), then bisecting to within
   --tolerance.
The budget is the card on CUDA (its free memory when the process starts), and
--budget-gib on the CPU, where it is required (a stand-in for a card; the resident set includes
the interpreter). Prints each implementation's largest batch, the prediction and the line; last
lines: `max_batch_ratio_vs_spikingjelly=X` (fullrange's largest batch over any of the memory
modes run / SpikingJelly default's) and, when it ran, `max_batch_ratio_vs_spikingjelly_memopt=Y`.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from memory import CUDA_IMPLS, IMPLS, build_step, fresh_process_result  # noqa: E402
from memory_probe import memory_around  # noqa: E402
from step import CASES  # noqa: E402

DEFAULT_IMPLS = "fullrange,fullrange spikes_1bit,fullrange spikes_1bit+2,spikingjelly,spikingjelly memopt"


def largest_fitting(fits: Callable[[int], bool], guess: int, lo: int = 0, hi: Optional[int] = None,
                    tolerance: float = 0.03, factor: float = 1.1, max_probes: int = 12) -> int:
    """The largest batch found to fit: probes fits(batch) from guess, growing while batches fit
    and shrinking while they do not (by `factor`, squared at each further move the same way),
    then bisecting between the largest batch that fit (lo; 0: none known) and the smallest that
    did not (hi; None: none known) until hi - lo <= max(1, tolerance * lo), or max_probes ran."""
    batch, reach = guess, factor
    for _ in range(max_probes):
        if hi is not None and hi - lo <= max(1, tolerance * lo):
            break
        batch = max(batch, lo + 1) if hi is None else min(max(batch, lo + 1), hi - 1)
        if fits(batch):
            lo = batch
        else:
            hi = batch
        if hi is None:  # nothing failed yet: grow
            batch, reach = int(lo * reach) + 1, reach * reach
        elif lo < hi / reach:  # far below the smallest failure: shrink toward lo
            batch, reach = int(hi / reach), reach * reach
        else:
            batch = (lo + hi) // 2
    return lo


def search(case_name: str, impl: str, budget: Optional[int], probe_batch: int, tolerance: float) -> dict:
    """One implementation in this process: the line, its prediction and the largest batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if budget is None:  # the card: its free memory before anything of this run is on it
        budget = torch.cuda.mem_get_info(device)[0]
    probes = []  # [batch, fits, peak MiB]

    def fits(batch: int) -> bool:
        step = None
        try:
            step, _, _ = build_step(case_name, impl, device, batch)
            _, peak, _ = memory_around(lambda: (step(), step()), device)
            ok = peak <= budget
        except torch.OutOfMemoryError:  # CUDA: this batch does not fit
            ok, peak = False, math.nan
        finally:
            del step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        probes.append([batch, ok, peak / 2**20])
        return ok

    small, large = fits(probe_batch), fits(2 * probe_batch)
    (_, _, p1), (_, _, p2) = probes
    per_image = (p2 - p1) / probe_batch  # MiB
    fixed = p1 - per_image * probe_batch
    predicted = int((budget / 2**20 - fixed) / per_image) if small and large and per_image > 0 else None
    lo = 2 * probe_batch if large else probe_batch if small else 0  # the largest known to fit
    hi = None if large else probe_batch * (2 if small else 1)  # the smallest known not to
    best = largest_fitting(fits, predicted or 4 * probe_batch, lo=lo, hi=hi, tolerance=tolerance)
    return {"case": case_name, "impl": impl, "device": str(device), "budget_MiB": budget / 2**20,
            "per_image_MiB": per_image, "fixed_MiB": fixed, "predicted": predicted, "max_batch": best,
            "probes": probes}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="preact34", choices=sorted(CASES))
    p.add_argument("--impls", default=DEFAULT_IMPLS,
                   help=f"comma-separated, of: {', '.join(IMPLS)} (and on CUDA {', '.join(CUDA_IMPLS)})")
    p.add_argument("--budget-gib", type=float, help="memory budget (CPU: required; CUDA: default the card)")
    p.add_argument("--probe-batch", type=int, default=16, help="b: the line is fitted at b and 2b")
    p.add_argument("--tolerance", type=float, default=0.03, help="relative resolution of the largest batch")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    p.add_argument("--one", metavar="IMPL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    known = IMPLS + (CUDA_IMPLS if torch.cuda.is_available() else ())
    unknown = [i for i in impls if i not in known]
    if unknown:
        p.error(f"--impls: unknown {unknown}; expected some of {', '.join(known)}")
    if args.budget_gib is None and not torch.cuda.is_available():
        p.error("--budget-gib is required on the CPU (there is no card to fill)")
    if args.probe_batch < 1 or not 0 < args.tolerance < 1:
        p.error("--probe-batch must be >= 1 and --tolerance in (0, 1)")
    budget = None if args.budget_gib is None else int(args.budget_gib * 2**30)
    if args.one:
        torch.set_num_threads(args.threads)
        print("MAXB " + json.dumps(search(args.case, args.one, budget, args.probe_batch, args.tolerance)))
        return
    flags = [f"--case={args.case}", f"--probe-batch={args.probe_batch}", f"--tolerance={args.tolerance}",
             f"--threads={args.threads}"] + ([f"--budget-gib={args.budget_gib}"] if budget is not None else [])
    rows = {}
    for impl in impls:
        r = fresh_process_result([__file__, "--one", impl, *flags], "MAXB", f"{args.case}/{impl}")
        if r is None:
            continue
        rows[impl] = r
        print(f"{args.case} {impl:24s} largest batch {r['max_batch']:6d} (the line predicted {r['predicted']}: "
              f"{r['fixed_MiB']:.0f} MiB + {r['per_image_MiB']:.2f} MiB/img; budget {r['budget_MiB']:.0f} MiB on "
              f"{r['device']}; probes {[(b, ok) for b, ok, _ in r['probes']]})", flush=True)
    ours = max((r["max_batch"] for k, r in rows.items() if k.startswith("fullrange")), default=0)
    for peer, suffix in (("spikingjelly", ""), ("spikingjelly memopt", "_memopt")):
        if peer in rows and rows[peer]["max_batch"] > 0:
            print(f"max_batch_ratio_vs_spikingjelly{suffix}={ours / rows[peer]['max_batch']:.3f}")


if __name__ == "__main__":
    main()
