"""DeepSpeed ZeRO through accelerate's plugin: everything the trainer does differently for it.

- Precision: DeepSpeed's own bf16/fp16 engine is turned off. It would cast the whole module,
  BatchNorm and its running statistics included, and model.pt would hold bf16-rounded weights.
  Instead the weights stay fp32 (ZeRO partitions fp32 optimizer state as usual) and the
  forward runs under torch.autocast like DDP's (fullrange.runtime.autocast).
- Batch and clipping come from the run config (a literal micro batch: FFCV loaders are not
  torch DataLoaders, so accelerate cannot infer it; accelerate would fill an "auto"
  gradient_clipping with 1.0).
- The step: DeepSpeed clips, checks the gradients for inf/NaN (skipping such a step, with one
  host sync inside DeepSpeed) and steps inside ``accelerator.backward``.
- Memory format: DeepSpeed broadcasts weights as flat bytes, so the model stays contiguous
  (no channels_last weights; inputs may still be channels_last).
"""
from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from fullrange.config import RunConfig


def deepspeed_config(acc: Accelerator) -> dict | None:
    """The DeepSpeed config dict when launched with accelerate's DeepSpeed plugin, else None."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    return acc.state.deepspeed_plugin.deepspeed_config


def fit_config(ds: dict, cfg: RunConfig, per_process_batch: int) -> None:
    """Make the DeepSpeed JSON agree with the run config (its own values are replaced)."""
    ds["train_micro_batch_size_per_gpu"] = per_process_batch
    ds["train_batch_size"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = float(cfg.optim.grad_clip)
    ds["bf16"] = {"enabled": False}  # fp32 weights; autocast does the mixed precision
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_allow_untested_optimizer", True)  # our SGD with two parameter groups
