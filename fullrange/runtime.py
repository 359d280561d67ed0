"""Process-level setup: the Accelerator and its precision, seeds, backend flags, a record of them.

Precision comes from the launch: accelerate's launch config (`mixed_precision:`) or its
`--mixed_precision` flag, which reach the processes as ACCELERATE_MIXED_PRECISION; the same
on CPU and GPU ("no" when neither says). bf16 and fp16 run the forward under torch.autocast
with fp32 weights (CPU autocast supports bf16 only); see fullrange.deepspeed_support for
DeepSpeed, which is run the same way.
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs

from fullrange.config import ConfigError

PRECISIONS = ("no", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launch_precision() -> str:
    """The mixed precision the launch asked for (ACCELERATE_MIXED_PRECISION, default "no")."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def check_precision(precision: str, on_cpu: bool, deepspeed: bool) -> None:
    """ConfigError (one line) for a precision this process cannot run."""
    if precision not in PRECISIONS:
        raise ConfigError(f"mixed precision {precision!r}: expected one of {PRECISIONS} (accelerate launch "
                          "--mixed_precision, or mixed_precision in the launch config)")
    if precision == "fp16" and on_cpu:
        raise ConfigError("mixed precision fp16 needs a GPU (CPU autocast runs bf16): launch with "
                          "--mixed_precision bf16 or no")
    if precision == "fp16" and deepspeed:
        raise ConfigError("mixed precision fp16 with DeepSpeed: fullrange runs DeepSpeed with fp32 weights under "
                          "autocast, and fp16 would need a loss scale; use bf16, or fp16 with DDP (GradScaler)")


def check_trackers(names) -> list[str]:
    """The tracker names, each of whose Python package is installed; ConfigError otherwise
    (accelerate would skip a missing one with a warning)."""
    import importlib.util

    for name in names or ():
        modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"config key log_with: tracker {name!r} needs the Python package {modules[0]!r} "
                              f"(pip install {modules[0]})")
    return list(names or ())


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap'd blocks, no trimming), so a
    training loop's same-sized tensors come back without page faults: every step of a CPU run
    otherwise re-faults its large activations (~1.5 us per 4 KiB page), ~20% of a demo step.
    The resident set then stays at the run's peak, as a GPU caching allocator's does. True when
    applied (glibc); elsewhere nothing changes. M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2^31 - 1."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def make_accelerator(timeout_s: int = 1800, log_with: list[str] | None = None, project_dir=None) -> Accelerator:
    """Accelerator for this process with the launch's precision; the process group (gloo on
    CPU, nccl on CUDA) only when launched with several processes (WORLD_SIZE > 1). timeout_s
    bounds every collective: a rank that died or hangs makes the others fail after at most that
    long. log_with: experiment trackers (accelerate's names), writing under project_dir.
    ConfigError for a precision the device cannot run (see check_precision)."""
    on_cpu = not torch.cuda.is_available() or _flag("ACCELERATE_USE_CPU")
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn on every rank
        keep_freed_cpu_memory()
    precision = launch_precision()
    check_precision(precision, on_cpu, deepspeed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    handlers = []
    if world_size > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl",
                                               timeout=timedelta(seconds=timeout_s)))
    # Say cpu=True on the CPU: launched from a config file without ACCELERATE_USE_CPU in the
    # environment, accelerate would report DistributedType.NO on every rank (no DDP, no-op
    # barriers and reductions) although the process group exists. DeepSpeed keeps its own type.
    acc = Accelerator(mixed_precision=precision, kwargs_handlers=handlers, cpu=on_cpu and not deepspeed,
                      log_with=check_trackers(log_with) or None,
                      project_dir=str(project_dir) if project_dir is not None else None)
    if world_size > 1 and acc.distributed_type == DistributedType.NO:
        raise RuntimeError(f"accelerate started {world_size} processes but no distributed mode; "
                           "check distributed_type in the launch config")
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
    return acc


def autocast(device: torch.device, precision: str):
    """A fresh autocast context for `precision` on `device` (a no-op for "no")."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype of prepared model inputs: the autocast dtype, else float32."""
    return AUTOCAST_DTYPES.get(precision, torch.float32)


def describe(acc: Accelerator, precision: str) -> dict:
    """What ran a job: precision, processes, device and versions (RUN/environment.json)."""
    info = {"mixed_precision": precision, "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "device": str(acc.device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "host": platform.node()}
    if acc.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(acc.device)
    return info


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (weight init, dropout). Augmentation never uses them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown(accelerator: Accelerator, barrier: bool = True) -> None:
    """End the process group cleanly (processes sometimes abort at exit otherwise).

    barrier=False after an error: a dead peer would make the barrier wait for the timeout."""
    if barrier:
        accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
