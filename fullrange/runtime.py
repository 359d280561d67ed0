"""Process-level setup: the Accelerator (bf16 autocast on CUDA, fp32 on CPU), seeds, threads."""
from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs


def make_accelerator(timeout_s: int = 1800) -> Accelerator:
    """Accelerator for this process; the process group (gloo on CPU, nccl on CUDA) only when
    launched with several processes (WORLD_SIZE > 1). timeout_s bounds every collective: a rank
    that died or hangs makes the others fail after at most that long (gloo usually notices a
    closed connection at once). Launched with accelerate's DeepSpeed plugin (distributed_type
    DEEPSPEED) the same backend and timeout reach deepspeed.init_distributed."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn on every rank
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    handlers = []
    if world_size > 1:
        handlers.append(InitProcessGroupKwargs(backend="nccl" if cuda else "gloo",
                                               timeout=timedelta(seconds=timeout_s)))
    # Without CUDA, say cpu=True: launched from a config file and no ACCELERATE_USE_CPU in the
    # environment, accelerate reports DistributedType.NO on every rank (no DDP, no-op barriers and
    # reductions) although the process group exists. DeepSpeed launches keep their own type.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", kwargs_handlers=handlers,
                      cpu=not cuda and not deepspeed)
    if world_size > 1 and acc.distributed_type == DistributedType.NO:
        raise RuntimeError(f"accelerate started {world_size} processes but no distributed mode; "
                           "check distributed_type in the launch config")
    return acc


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
