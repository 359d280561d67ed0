"""The deployment report of trained runs: accuracy at every T' = 1..T_max from ONE forward pass
at T_max (fullrange.evaluate), and from the same pass firing rates, synaptic operations and
energy per T' and confidence-based early exit (fullrange.deploy_stats); export at a chosen T'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fullrange.config import RunConfig, from_dict
from fullrange.deploy_stats import EXIT_THRESHOLDS, DeployStats, deploy_report
from fullrange.evaluate import accuracies, all_reduce_counts, prefix_counts
from fullrange.models import build_model, is_spiking

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


def run_log_with(runs: Sequence[Path]) -> list[str]:
    """The trackers named by the runs' configs (log_with), each once, in order."""
    import yaml

    names: list[str] = []
    for run in runs:
        for name in (yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}).get("log_with", []) or []:
            if name not in names:
                names.append(name)
    return names


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
    from fullrange.data import BatchPreparer, ViewSpec, device_batches, read_sidecar, val_loader
    from fullrange.runtime import autocast, input_dtype

    cfg, model = load_run(run_dir)
    spiking = is_spiking(cfg.model.name)
    T_train = cfg.model.T if spiking else 1
    T_max = (T_max or 2 * T_train) if spiking else 1
    path = val_path or cfg.data.val_path
    meta = read_sidecar(path)
    spec, precision, device = ViewSpec.from_config(cfg), accelerator.mixed_precision, accelerator.device
    loader = val_loader(path, batch_size or cfg.data.val_batch_size,
                        cfg.data.num_workers if num_workers is None else num_workers,
                        accelerator.process_index, accelerator.num_processes, spec, os_cache=cfg.data.os_cache)
    prep = BatchPreparer(meta, spec, dtype=input_dtype(precision), channels_last=cfg.data.channels_last)
    model = model.to(device)
    if cfg.data.channels_last:  # as in training: faster convolutions on the CPU, same counts
        model = model.to(memory_format=torch.channels_last)
    stats = None if thresholds is None else DeployStats(model, T_max, thresholds, device)
    batches = (prep.eval(b) for b in device_batches(loader, device))
    counts = prefix_counts(model, batches, T_max, spiking, lambda: autocast(device, precision), stats)
    counts = all_reduce_counts(counts, device)
    result = {"T_train": T_train, "T_max": T_max, **accuracies(counts)}
    if stats is not None:
        result.update(deploy_report(counts, thresholds, result["total"], T_max))
    return result


if __name__ == "__main__":  # `python -m fullrange.sweep RUN_DIR ...`: the same as launcher/sweep.py
    import sys

    from fullrange.cli import sweep_main

    sys.exit(sweep_main())
