"""Full-range evaluation: accuracy at every T' = 1..T_max from ONE forward pass at T_max.

A spiking student is causal in time at inference (LIF state flows forward, BatchNorm uses
running statistics), so the answer of a deployment with T' steps is the mean of the first T'
logits of a single run at T_max: ``prefix_mean(z)[T'-1]``. Counting is exact in any world size:
each rank scores its own shard of the validation set (no padding, see
``fullrange.data.val_loader``) and the integer counts are summed across ranks. Used by the
trainer (validation every epoch) and the sweep (the deployment report).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

TOPK = (1, 5)


def logits_over_time(model: nn.Module, x: torch.Tensor, T: int, spiking: bool) -> torch.Tensor:
    """Images [B, C, H, W] -> logits [T, B, C]; an ANN's [B, C] becomes [1, B, C]."""
    return model(x, T) if spiking else model(x).unsqueeze(0)


def prefix_mean(logits: torch.Tensor) -> torch.Tensor:
    """[T, B, C] logits -> [T, B, C] where entry t is the mean of logits 0..t (float32)."""
    T = logits.shape[0]
    steps = torch.arange(1, T + 1, device=logits.device, dtype=torch.float32).view(T, 1, 1)
    return logits.float().cumsum(0) / steps


def topk_hits(prefix: torch.Tensor, labels: torch.Tensor, kmax: int) -> torch.Tensor:
    """prefix [T, B, C], labels [B] -> bool [T, B, kmax]: entry j says the label is the j-th best class."""
    top = prefix.topk(min(kmax, prefix.shape[-1]), dim=-1).indices  # [T, B, kmax]
    return top == labels.view(1, -1, 1)


def topk_correct(prefix: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = TOPK,
                 hit: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """prefix [T, B, C], labels [B] -> {k: int64 [T] samples whose label is in the top k} (on
    prefix's device)."""
    hit = topk_hits(prefix, labels, max(ks)) if hit is None else hit
    return {k: hit[..., :min(k, hit.shape[-1])].any(-1).sum(1).long() for k in ks}


@torch.no_grad()
def prefix_counts(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], T_max: int,
                  spiking: bool, autocast: Callable | None = None, stats=None) -> dict:
    """Correct counts at every T' for this process's batches (inputs [B, C, H, W], labels [B]).

    Returns {"top1": int64 [T_max], "top5": int64 [T_max], "total": int64 scalar} (local counts,
    on the CPU). With ``stats`` (a fullrange.deploy_stats.DeployStats for this model at T_max),
    its hooks count spikes, synaptic operations and early exits during the same forward passes
    and its counts join the result. autocast: a context-manager factory (mixed precision)."""
    T = T_max if spiking else 1
    counts: dict = {}
    total = 0
    was_training = model.training
    model.eval()
    with stats.attached(model) if stats is not None else contextlib.nullcontext():
        for x, y in batches:
            if stats is not None:
                stats.begin_batch(y.shape[0])
            with autocast() if autocast is not None else contextlib.nullcontext():
                z = logits_over_time(model, x, T, spiking)
            prefix = prefix_mean(z)
            hit = topk_hits(prefix, y, max(TOPK))
            for k, c in topk_correct(prefix, y, hit=hit).items():
                counts[f"top{k}"] = counts.get(f"top{k}", 0) + c
            if stats is not None:
                stats.end_batch(prefix, hit[..., 0])
            total += y.shape[0]
    model.train(was_training)
    counts = {k: counts.get(k, torch.zeros(T, dtype=torch.long)).cpu() for k in (f"top{k}" for k in TOPK)}
    counts["total"] = torch.tensor(total, dtype=torch.long)
    if stats is not None:
        counts.update(stats.counts)
    return counts


def all_reduce_counts(counts: dict, device: torch.device) -> dict:
    """Sum integer counts over all ranks (identity when not distributed); CPU tensors out."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    out = {}
    for name, value in counts.items():
        t = value.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[name] = t.cpu()
    return out


def accuracies(counts: dict) -> dict:
    """Counts -> {"total": N, "top1": [acc % per T'], "top1_correct": [count per T'], "top5"...} (JSON-ready)."""
    n = int(counts["total"])
    out = {"total": n}
    for k in TOPK:
        correct = [int(c) for c in counts[f"top{k}"]]
        out[f"top{k}"] = [100.0 * c / max(n, 1) for c in correct]
        out[f"top{k}_correct"] = correct
    return out
