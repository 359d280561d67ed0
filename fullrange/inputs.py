"""The checks of a training run that need no training: they fail with one ConfigError line
(exit 2) before any process group work, model or loader exists."""
from __future__ import annotations

from pathlib import Path

from fullrange.config import ConfigError, RunConfig
from fullrange.checkpoint import latest_checkpoint
from fullrange.config import from_dict, to_dict
from fullrange.data import check_beton
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
            metas[key] = check_beton(path)  # sidecar, size, header and fields
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
    if cfg.resume and latest_checkpoint(run_dir) is not None:
        check_resumable(cfg)
    return meta, cache


# Keys that a resumed run may change: they decide how the run is executed or reported, not what
# it computes. Everything else (data, batch, seed, model, neuron, loss, optim, teacher,
# max_steps_per_epoch) must equal the checkpointed run's; optim.epochs too, since the cosine
# schedule's length sets every later learning rate (train longer with a new run instead).
RESUME_SAFE = ("name", "out_dir", "resume", "log_every", "checkpoint_every_steps", "stop_check_every",
               "dist_timeout_s", "log_with", "data.num_workers", "data.os_cache", "data.batches_ahead",
               "data.val_batch_size", "neuron.backend", "teacher.cache_dir", "model.memory")  # model.memory: exact, same numbers


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(cfg: RunConfig) -> None:
    """ConfigError listing every key that differs from the run being resumed (RUN/config.yaml)
    in a way that breaks an exact continuation (see RESUME_SAFE)."""
    import yaml

    path = cfg.run_dir / "config.yaml"
    try:
        saved = _flat(to_dict(from_dict(yaml.safe_load(path.read_text()))))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"config key resume: {path} is missing or unreadable ({str(e).splitlines()[0]}); it "
                          "records the run to continue (resume=false with another name=... starts afresh)") from None
    now = _flat(to_dict(cfg))
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k not in RESUME_SAFE and now[k] != saved.get(k)]
    if changed:
        raise ConfigError(f"config key resume: {cfg.run_dir} was trained with other settings, and resuming would "
                          f"not continue it exactly: {'; '.join(changed)} (use the run's own values, or another "
                          "name=... for a new run)")

