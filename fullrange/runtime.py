"""Process-level setup: the Accelerator (bf16 autocast on CUDA, fp32 on CPU), seeds, threads."""
from __future__ import annotations

import random
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs


def make_accelerator(timeout_s: int = 1800) -> Accelerator:
    cuda = torch.cuda.is_available()
    pg = InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Accelerator(mixed_precision="bf16" if cuda else "no", kwargs_handlers=[pg])


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (weight init, dropout). Augmentation never uses them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown(accelerator: Accelerator) -> None:
    """End the process group cleanly (processes sometimes abort at exit otherwise)."""
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
