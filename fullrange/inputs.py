"""The checks of a training run that need no training: they fail with one ConfigError line
(exit 2) before any process group work, model or loader exists."""
from __future__ import annotations

from pathlib import Path

from fullrange.config import ConfigError, RunConfig
from fullrange.data import read_sidecar
from fullrange.losses import NEEDS_TEACHER
from fullrange.teacher_cache import TeacherCache
from fullrange.teachers import load_teacher


def check_inputs(cfg: RunConfig, world_size: int) -> tuple[dict, TeacherCache | None]:
    """Every check that needs no training: data files and their metadata against the config,
    the teacher weights or cache, the batch split and the run directory. Returns the train
    sidecar and the checked teacher cache (None unless teacher.source is cache)."""
    metas = {}
    for key in ("data.train_path", "data.val_path"):
        path = Path(getattr(cfg.data, key.split(".")[1]))
        if not path.is_file():
            raise ConfigError(f"config key {key}: data file {path} not found (expected an FFCV .beton; "
                              "write the bundled data with `python launcher/write_ffcv.py bundled fmnist data/fmnist`)")
        try:
            metas[key] = read_sidecar(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key {key}: {e}") from None
    meta = metas["data.train_path"]
    h, w, c = meta["shape"]
    if c != cfg.model.in_channels:
        raise ConfigError(f"config key model.in_channels: {cfg.data.train_path} has {c} channels, "
                          f"config says {cfg.model.in_channels}")
    if meta["num_classes"] != cfg.model.num_classes:
        raise ConfigError(f"config key model.num_classes: {cfg.data.train_path} has {meta['num_classes']} "
                          f"classes, config says {cfg.model.num_classes}")
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"config key data.batch_size: {cfg.data.batch_size} does not split evenly "
                          f"over {world_size} processes")
    cache = None
    if NEEDS_TEACHER[cfg.loss.kind]:
        if cfg.teacher.source == "cache":
            cache = TeacherCache(cfg.teacher.cache_dir)
            cache.check(cfg, meta)
        else:
            load_teacher(cfg)
    run_dir = cfg.run_dir
    if not cfg.resume and ((run_dir / "checkpoints").exists() or (run_dir / "model.pt").exists()):
        raise ConfigError(f"config key resume: run directory {run_dir} already holds a run; pass resume=true "
                          "to continue it or choose another name=... (nothing was overwritten)")
    return meta, cache

