"""Benchmark: one full training step of a student (forward at T, full-range loss against given
teacher logits, backward, the guarded fused SGD step) as the trainer runs it: img/s and peak
memory. On CUDA bf16 autocast by default; on CPU fp32.

    python bench/train_step.py --model spiking_preact_resnet34 --T 4 --batch 64 --size 224

Prints one JSON line: {"model", "T", "batch", "size", "device", "precision", "step_ms",
"img_per_s", "peak_mib"} (peak: torch.cuda.max_memory_allocated on CUDA, peak RSS on CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fullrange.config import OptimConfig  # noqa: E402
from fullrange.evaluate import logits_over_time  # noqa: E402
from fullrange.losses import full_range_loss  # noqa: E402
from fullrange.models import build_model  # noqa: E402
from fullrange.optim import GuardedStep, build_optimizer  # noqa: E402
from fullrange.runtime import autocast  # noqa: E402


class _NoScaler:
    scaler = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="spiking_preact_resnet34")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--precision", choices=("no", "bf16"), default=None, help="default: bf16 on CUDA, no on CPU")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    torch.backends.cudnn.benchmark = True
    model = build_model(args.model, args.classes, 3).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig())
    step = GuardedStep(_NoScaler(), optimizer, list(model.parameters()), 0.0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    z_a = torch.randn(args.batch, args.classes, device=device)

    def one() -> None:
        with autocast(device, precision):
            loss, _ = full_range_loss(logits_over_time(model, x, args.T, True), y, z_a)
        loss.backward()
        step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    ms = 1e3 * statistics.median(times)
    print(json.dumps({"model": args.model, "T": args.T, "batch": args.batch, "size": args.size,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "precision": precision, "step_ms": round(ms, 2), "img_per_s": round(args.batch / ms * 1e3, 1),
                      "peak_mib": round(peak, 1)}))


if __name__ == "__main__":
    main()
