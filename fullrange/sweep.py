"""Full-range evaluation: accuracy at every T' = 1..T_max from ONE forward pass at T_max.

A spiking student is causal in time at inference (LIF state flows forward, BatchNorm uses
running statistics), so the answer of a deployment with T' steps is the mean of the first T'
logits of a single run at T_max: ``prefix_mean(z)[T'-1]``.

Counting is exact in any world size: each rank scores its own shard of the validation set (no
padding, see ``fullrange.data.val_loader``), and integer counts are summed across ranks.

The same pass also yields the deployment report (``fullrange.deploy_stats``): firing rates,
synaptic operations and energy per T', and confidence-based early exit.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fullrange.config import RunConfig, from_dict
from fullrange.deploy_stats import EXIT_THRESHOLDS, DeployStats, deploy_report
from fullrange.models import build_model, is_spiking

TOPK = (1, 5)


def prefix_mean(logits: torch.Tensor) -> torch.Tensor:
    """[T, B, C] logits -> [T, B, C] where entry t is the mean of logits 0..t (float32)."""
    T = logits.shape[0]
    steps = torch.arange(1, T + 1, device=logits.device, dtype=torch.float32).view(T, 1, 1)
    return logits.float().cumsum(0) / steps


def logits_over_time(model: nn.Module, x: torch.Tensor, T: int, spiking: bool) -> torch.Tensor:
    """Images [B, C, H, W] -> logits [T, B, C]; an ANN's [B, C] becomes [1, B, C]."""
    return model(x, T) if spiking else model(x).unsqueeze(0)


def topk_hits(prefix: torch.Tensor, labels: torch.Tensor, kmax: int) -> torch.Tensor:
    """prefix [T, B, C], labels [B] -> bool [T, B, kmax]: entry j says the label is the j-th best class."""
    top = prefix.topk(min(kmax, prefix.shape[-1]), dim=-1).indices  # [T, B, kmax]
    return top == labels.view(1, -1, 1)


def topk_correct(prefix: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = TOPK,
                 hit: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """prefix [T, B, C], labels [B] -> {k: int64 [T] number of samples whose label is in the top k}."""
    hit = topk_hits(prefix, labels, max(ks)) if hit is None else hit
    return {k: hit[..., :min(k, hit.shape[-1])].any(-1).sum(1).long().cpu() for k in ks}


@torch.no_grad()
def prefix_counts(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], T_max: int,
                  spiking: bool, autocast=None, stats: DeployStats | None = None) -> dict:
    """Correct counts at every T' for this process's batches (images float [B,C,H,W], labels [B]).

    Returns {"top1": int64 [T_max], "top5": int64 [T_max], "total": int64 scalar} (local counts).
    With ``stats`` (a DeployStats for this model at T_max), its hooks count spikes, synaptic
    operations and early exits during the same forward passes and its counts join the result.
    """
    T = T_max if spiking else 1
    counts = {f"top{k}": torch.zeros(T, dtype=torch.long) for k in TOPK}
    total = torch.zeros((), dtype=torch.long)
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
                counts[f"top{k}"] += c
            if stats is not None:
                stats.end_batch(prefix, hit[..., 0])
            total += y.shape[0]
    model.train(was_training)
    counts["total"] = total
    if stats is not None:
        counts.update(stats.counts)
    return counts


def all_reduce_counts(counts: dict, device: torch.device) -> dict:
    """Sum integer counts over all ranks (identity when not distributed)."""
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


def load_run(run_dir: Path) -> tuple[RunConfig, nn.Module]:
    """A run directory's resolved config and its last weights (model.pt), on CPU."""
    import yaml

    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.yaml", run_dir / "model.pt"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (expected a run directory written by launcher/train.py)")
    cfg = from_dict(yaml.safe_load(cfg_path.read_text()))
    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.in_channels, vars(cfg.neuron))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return cfg, model


def export_run(run_dir: Path, T: int, out_dir: Path | None = None) -> Path:
    """Write a student ready to deploy at T timesteps: OUT/model.pt and OUT/config.yaml (model.T = T).

    OUT defaults to RUN_DIR/export_T{T}; it is itself a run directory (``load_run`` and the
    sweep accept it). When RUN_DIR/sweep.json covers T, OUT/deploy.json records that run's
    numbers at T (accuracy, firing rate, SOPs, energy). Files are written atomically.
    """
    import dataclasses
    import json

    from fullrange.atomic import torch_save_atomic, write_text_atomic
    from fullrange.config import save_config

    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir)
    if not is_spiking(cfg.model.name):
        raise ValueError(f"{run_dir}: model {cfg.model.name!r} is an ANN; only spiking students have a T to export")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"--export: expected an integer T' >= 1, got {T!r}")
    out = Path(out_dir) if out_dir is not None else run_dir / f"export_T{T}"
    exported = dataclasses.replace(cfg, name=out.name, out_dir=str(out.parent), resume=False,
                                   model=dataclasses.replace(cfg.model, T=T))
    torch_save_atomic(model.state_dict(), out / "model.pt")
    save_config(exported, out / "config.yaml")
    sweep_json = run_dir / "sweep.json"
    if sweep_json.is_file():
        report = json.loads(sweep_json.read_text()).get(run_dir.name, {})
        if len(report.get("top1", [])) >= T:
            at = lambda key: report[key][T - 1] if key in report else None  # noqa: E731
            deploy = {"source_run": str(run_dir), "T_train": report.get("T_train"), "T": T,
                      "total": report.get("total"), "top1": at("top1"), "top5": at("top5"),
                      "firing_rate": report.get("firing_rate", {}).get("overall", [None] * T)[T - 1],
                      "sops_per_image": at("sops_per_image"), "macs_per_image": at("macs_per_image"),
                      "energy_uJ_per_image": at("energy_uJ_per_image"),
                      "energy_model": report.get("energy_model")}
            write_text_atomic(out / "deploy.json", json.dumps(deploy, indent=2))
    return out


def iterate_prepared(loader: Iterable, prepare) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Loader batches (images uint8, labels, indices) -> (images float on device, labels on device)."""
    for images, labels, _ in loader:
        x, y = prepare(images, labels)
        yield x, y


def sweep_run(run_dir: Path, T_max: int | None, accelerator, val_path: str | None = None,
              batch_size: int | None = None, num_workers: int | None = None,
              thresholds: Sequence[float] | None = EXIT_THRESHOLDS) -> dict:
    """Accuracy at every T' = 1..T_max (default 2 x training T) of one run, exact over all ranks.

    Collective: every rank calls it and scores its own shard of the validation set.
    Returns {"T_train", "T_max", "total", "top1": [..], "top5": [..], "top1_correct", "top5_correct"}
    (percent and counts) plus, unless ``thresholds`` is None, the deployment report of
    ``fullrange.deploy_stats.deploy_report`` (firing rates, SOPs, energy, early exit) from the
    same forward pass.
    """
    from fullrange.batches import BatchPreparer
    from fullrange.data import read_sidecar, val_loader, view_options

    cfg, model = load_run(run_dir)
    spiking = is_spiking(cfg.model.name)
    T_train = cfg.model.T if spiking else 1
    T_max = (T_max or 2 * T_train) if spiking else 1
    path = val_path or cfg.data.val_path
    meta = read_sidecar(path)
    loader = val_loader(path, batch_size or cfg.data.val_batch_size,
                        cfg.data.num_workers if num_workers is None else num_workers,
                        accelerator.process_index, accelerator.num_processes, os_cache=cfg.data.os_cache,
                        **view_options(cfg.data)["val"])
    prep = BatchPreparer(accelerator.device, meta["mean"], meta["std"], cfg.seed, 0, False, cfg.data.channels_last,
                         dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32)
    model = model.to(accelerator.device)
    if cfg.data.channels_last:  # as in training: faster convolutions on the CPU, same counts
        model = model.to(memory_format=torch.channels_last)
    stats = None if thresholds is None else DeployStats(model, T_max, thresholds, accelerator.device)
    counts = prefix_counts(model, iterate_prepared(loader, prep.eval), T_max, spiking, accelerator.autocast, stats)
    counts = all_reduce_counts(counts, accelerator.device)
    result = {"T_train": T_train, "T_max": T_max, **accuracies(counts)}
    if stats is not None:
        result.update(deploy_report(counts, thresholds, result["total"], T_max))
    return result
